"""SIGKILL a real-model job at random moments, resume it each time, and compare the result with an
uninterrupted run: keys *and* texts (issue 28; docs/reliability.md, "Kills").

    python benchmarks/kill_loop.py [--kills 20] [--job jobs/extract.yaml] [--input jobs/sample/docs.parquet]
                                   [--limit N] [--device cpu] [--seed 0] [--workdir DIR] [-- RUN OPTIONS]

Options after ``--`` go to every ``corpusgen run`` (``-- --policy small-blocks.yaml``: smaller
blocks commit more often, so kills land between commits).

1. An uninterrupted reference run: ``corpusgen run JOB --input INPUT --output WORK/ref``; its wall
   time and its model-loading time (the ``runs`` table) size the kill moments.
2. ``--kills`` runs of the same command on ``WORK/killed``, each SIGKILLed: one in four at a
   moment drawn uniformly in its start-up (0.2 s to the reference's loading time), the others once
   they generate (``progress.json`` names their pid), after a delay drawn uniformly up to twice
   the reference's generation time divided by the number of kills, or a third of it if that is
   more (a run must sometimes get past its first commits) — so kills land in start-up, generation
   and commits. A run that finishes before its kill ends the loop.
3. One more run to the end.
4. The comparison, from every committed part (the manifest's list) of each directory: input keys
   lost, keys present more than once, keys that are not the reference's, and rows whose status or
   text differ from the reference's.

Texts may differ where the engine's arithmetic depends on the batch a row was generated in (a
resume cuts the job elsewhere); keys must never be lost or duplicated. Exit code 1 when a key is
lost, duplicated or foreign. The default model on a 2-core CPU takes tens of minutes for 20 kills
over the 50 sample rows; ``--limit`` shortens it.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def corpusgen(args: list[str], out: Path) -> subprocess.Popen:
    """``python -m corpusgen run …`` in its own process group (a kill takes every thread with it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "corpusgen", "run", *args, "--output", str(out)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def generating(proc: subprocess.Popen, out: Path) -> None:
    """Wait until ``proc`` generates (its pid in ``out/progress.json``) or ends."""
    import json

    while proc.poll() is None:
        try:
            if json.loads((out / "progress.json").read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)


def outputs(out: Path) -> list[dict]:
    """Every row of every committed part (duplicates kept), as dicts of key, status, text."""
    import pyarrow.parquet as pq

    from corpusgen.job.runner import committed_parts

    rows = []
    for part in committed_parts(out):
        rows += pq.read_table(part, columns=["key", "status", "text"]).to_pylist()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--job", default="jobs/extract.yaml")
    ap.add_argument("--input", default="jobs/sample/docs.parquet")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where ref/ and killed/ go (default: a new temporary directory)")
    ap.add_argument("run_options", nargs="*", help="after --: passed to every corpusgen run")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="kill-loop-"))
    args = [a.job, "--input", a.input, "--device", a.device, *(["--limit", str(a.limit)] if a.limit else []),
            *a.run_options]
    rng = random.Random(a.seed)

    t0 = time.monotonic()
    ref = corpusgen(args, work / "ref")
    _, err = ref.communicate()
    ref_seconds = time.monotonic() - t0
    if ref.returncode != 0:
        print(f"the reference run failed (rc {ref.returncode}): {err.strip()}")
        return 2
    from corpusgen.job.reading import job_status

    run = job_status(work / "ref")["runs"][-1]
    load = run["load_seconds"] or 0.0
    generation = max(ref_seconds - load, 1.0)
    print(f"reference: {run['rows']} rows in {ref_seconds:.1f} s (loading {load:.1f} s); "
          f"kills in start-up up to {load:.1f} s, in generation up to "
          f"{max(2 * generation / max(a.kills, 1), generation / 3):.1f} s in")

    killed_dir, kills = work / "killed", 0
    # a run must get past its first commits now and then: never less than a third of the generation
    step = max(2 * generation / max(a.kills, 1), generation / 3)
    for i in range(a.kills):
        proc = corpusgen(args, killed_dir)
        started = time.monotonic()
        if rng.random() < 0.25:
            where, moment = "start-up", rng.uniform(0.2, max(load, 0.3))
        else:
            generating(proc, killed_dir)
            where, moment = "generation", time.monotonic() - started + rng.uniform(0.0, step)
        try:
            proc.wait(timeout=max(moment - (time.monotonic() - started), 0.0))
            print(f"run {i + 1}: finished before its kill ({where}, {moment:.1f} s); no more kills")
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        done = job_status(killed_dir)["rows_done"] if (killed_dir / "manifest.sqlite").exists() else 0
        print(f"run {i + 1}: SIGKILL in {where} at {moment:.1f} s; rows committed so far: {done}")
    final = corpusgen(args, killed_dir)
    _, err = final.communicate()
    if final.returncode != 0:
        print(f"the final run failed (rc {final.returncode}): {err.strip()}")
        return 2

    want = {r["key"]: r for r in outputs(work / "ref")}
    got = outputs(killed_dir)
    count = collections.Counter(r["key"] for r in got)
    lost = sorted(set(want) - set(count))
    duplicated = sorted(k for k, n in count.items() if n > 1)
    foreign = sorted(set(count) - set(want))
    first = {}
    for r in got:
        first.setdefault(r["key"], r)
    status_diff = [k for k in want if k in first and first[k]["status"] != want[k]["status"]]
    text_diff = [k for k in want if k in first and first[k]["text"] != want[k]["text"]]
    runs = len(job_status(killed_dir)["runs"])
    print(f"kills: {kills} SIGKILLs ({runs} runs got as far as recording themselves); rows: reference {len(want)}, "
          f"killed-and-resumed {len(got)}")
    print(f"lost: {len(lost)}; duplicated: {len(duplicated)}; not in the reference: {len(foreign)}; "
          f"status differs: {len(status_diff)}; text differs: {len(text_diff)}")
    for name, keys in (("lost", lost), ("duplicated", duplicated), ("foreign", foreign), ("text differs", text_diff)):
        if keys:
            print(f"  {name}: {', '.join(map(str, keys[:10]))}{' …' if len(keys) > 10 else ''}")
    print(f"directories: {work}")
    return 1 if lost or duplicated or foreign else 0


if __name__ == "__main__":
    sys.exit(main())
