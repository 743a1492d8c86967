"""Committed parts checked against the manifest that lists them: present, a regular file, the
size (always) and the sha256 (when asked, or when the file changed since its commit) it was
committed with; the manifest's keys against the rows of each part; and what a crash left
uncommitted. ``run`` refuses a damaged part and regenerates a missing one; ``status`` and ``sql``
(reading.py) refuse both.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from corpusgen.errors import OutputError
from corpusgen.job.lock import own_file_problem
from corpusgen.job.manifest import Manifest, check_not_lost
from corpusgen.job.writer import part_number

MISSING = "missing"


def committed_at(part: Mapping[str, Any]) -> float:
    """The commit time of a part as a POSIX timestamp (the manifest stores whole seconds)."""
    try:
        return datetime.fromisoformat(part["committed_at"]).timestamp()
    except (TypeError, ValueError):
        return 0.0  # unknown: any modification time counts as later


def part_problem(path: Path, part: Mapping[str, Any], *, sha256: bool | None) -> str | None:
    """What is wrong with the file of a committed part: :data:`MISSING`, a reason it is damaged, or
    None when it matches the manifest. The size is always compared; the sha256 when ``sha256`` is
    True, or — ``sha256=None`` — when the file may have been modified since its commit: its mtime
    differs from the one recorded at commit (manifests before ``mtime_ns``: it is at least a second
    later than ``committed_at``, which is rounded down to the second)."""
    why = own_file_problem(path)
    if why is not None:
        return f"it {why}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return MISSING
    except OSError as e:
        return f"it cannot be examined ({e.strerror})"
    if st.st_size != part["size"]:
        return f"{st.st_size} bytes, committed with {part['size']}"
    if sha256 is None:
        recorded = part.get("mtime_ns")
        sha256 = st.st_mtime_ns != recorded if recorded is not None else st.st_mtime >= committed_at(part) + 1.0
    if sha256:
        try:
            digest = _sha256(path)
        except OSError as e:
            return f"it cannot be read ({e.strerror})"
        if digest != part["sha256"]:
            return "its contents changed since it was committed (sha256 differs)"
    return None


def damaged_part_error(path: Path, part: Mapping[str, Any], why: str) -> OutputError:
    return OutputError(f"{path}: committed part is damaged ({why}); its {part['rows']} rows cannot be trusted. "
                       "Restore it from a backup, or delete it and run again to generate those rows again")


def verify_parts(out_dir: Path, manifest: Manifest) -> list[str]:
    """Check every committed part against its size and sha256 in the manifest before resuming.

    A damaged part, or part files next to a manifest that knows no job (it was lost or replaced),
    raise OutputError saying what to do; never silently accepted. Returns the committed parts whose
    file is missing (the caller forgets them so that their rows are generated again).
    """
    check_not_lost(out_dir, manifest)
    missing = []
    for p in manifest.parts():
        why = part_problem(out_dir / p["name"], p, sha256=True)
        if why == MISSING:
            missing.append(p["name"])
        elif why is not None:
            raise damaged_part_error(out_dir / p["name"], p, why)
    return missing


def check_keys(out_dir: Path, manifest: Manifest) -> list[str]:
    """Check the manifest's keys against its parts before resuming (after :func:`verify_parts`, so
    every part file matches its sha256): a part whose key count differs from its rows — keys lost or
    added by hand or by a damaged file — gets its keys rebuilt from the file, and keys naming no
    part are dropped. Otherwise a lost key's row would be generated a second time, and a stray key's
    row never. Returns a warning per repair."""
    import pyarrow.parquet as pq

    parts = {p["name"]: p for p in manifest.parts()}
    counts = manifest.key_counts()
    warnings = []
    dangling = sorted(name for name in counts if name not in parts)
    if dangling:
        manifest.forget_keys_of(dangling)
        n = sum(counts[name] for name in dangling)
        warnings.append(f"the manifest held {n} keys of parts it does not list ({dangling[0]}, ...): dropped, "
                        "their rows will be generated again")
    for name, p in parts.items():
        if counts.get(name, 0) == p["rows"]:
            continue
        try:
            keys = pq.read_table(out_dir / name, columns=["key"]).column("key").to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for an unreadable file
            raise damaged_part_error(out_dir / name, p, f"cannot read its keys: {str(e).splitlines()[0]}") from None
        if len(keys) != p["rows"] or len(set(keys)) != len(keys):
            raise damaged_part_error(out_dir / name, p, f"{len(keys)} keys in the file, {p['rows']} in the manifest")
        manifest.replace_keys(name, keys)
        warnings.append(f"the manifest listed {counts.get(name, 0)} keys for {name}, which holds {p['rows']} rows: "
                        "its keys were rebuilt from the file (no row is generated twice)")
    return warnings


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_orphans(out_dir: Path, manifest: Manifest) -> list[str]:
    """Delete part files the manifest does not list and leftover ``.tmp`` files; return their names."""
    known = {p["name"] for p in manifest.parts()}
    removed = []
    for p in sorted(out_dir.iterdir()):
        if p.name.endswith(".tmp") or (part_number(p.name) is not None and p.name not in known):
            try:
                p.unlink()  # a link is removed, never followed
            except OSError as e:
                raise OutputError(f"{p}: cannot remove this file the manifest does not list ({e.strerror}); "
                                  "remove it and run again") from None
            removed.append(p.name)
    return removed
