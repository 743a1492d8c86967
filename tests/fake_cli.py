"""``corpusgen`` with the fake engine passed in, for tests that need a real process (kill loops,
torchrun, signals): ``python tests/fake_cli.py run JOB.yaml …``. Production code never loads a
test double; this script hands one to ``run_job`` the way a library caller would."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_engine  # noqa: E402

from corpusgen.job import runner  # noqa: E402


def use_fake_engine(setattr_=setattr) -> None:
    """Make ``run_job`` (as the CLI calls it) use the fake engine unless given another factory.
    ``setattr_``: pytest's ``monkeypatch.setattr`` to undo it after a test."""
    real = getattr(runner.run_job, "func", runner.run_job)
    setattr_(runner, "run_job", functools.partial(real, engine_factory=fake_engine.open_engine))


SCRIPT = str(Path(__file__).resolve())
"""This file, for ``[sys.executable, SCRIPT, "run", …]`` and ``torchrun … SCRIPT run …``."""

if __name__ == "__main__":
    use_fake_engine()
    from corpusgen.cli import cli

    cli(prog_name="corpusgen")
