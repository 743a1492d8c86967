"""Shared fixtures: small corpora on disk, job files, the fake engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import fake_engine

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "jobs" / "sample"


def make_rows(n: int, *, prefix: str = "doc") -> list[dict[str, Any]]:
    """n rows with id, kind, title, text; text lengths vary so answers and prompts differ."""
    kinds = ["package", "ticket", "abstract"]
    return [{"id": f"{prefix}-{i:04d}", "kind": kinds[i % 3], "title": f"Title {i}",
             "text": " ".join(f"word{i}_{j}" for j in range(1 + (i * 7) % 23))} for i in range(n)]


def write_parquet(path: Path, rows: list[dict[str, Any]], **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, **kw)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A 40-row Parquet corpus."""
    return write_parquet(tmp_path / "data" / "docs.parquet", make_rows(40))


def write_job(directory: Path, name: str = "job", **sections: Any) -> Path:
    """A job YAML in ``directory``; ``sections`` are merged over a default job."""
    job: dict[str, Any] = {
        "name": name,
        "input": {"path": "data/docs.parquet", "id": "id"},
        "prompt": {"template": "{{ title }}: {{ text }}"},
        "generation": {"max_new_tokens": 64},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.fixture
def job_file(tmp_path: Path, corpus: Path) -> Path:
    """A job over ``corpus`` with no schema."""
    return write_job(tmp_path)


@pytest.fixture
def fake_factory():
    """open_engine of the fake engine (deterministic, instant)."""
    return fake_engine.open_engine


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI use the fake engine (passed to run_job; subprocesses run tests/fake_cli.py)."""
    import fake_cli

    fake_cli.use_fake_engine(monkeypatch.setattr)
    monkeypatch.delenv("CORPUSGEN_FAKE_DELAY", raising=False)


def read_outputs(out_dir: Path) -> pa.Table:
    """All committed parts of an output directory, sorted by key."""
    from corpusgen.job.runner import committed_parts

    parts = committed_parts(out_dir)
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    return table.sort_by("key")
