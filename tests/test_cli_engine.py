"""The planning and engine commands (profile, plan, bench) and `run --policy auto`, through CliRunner.

Every test runs in a temporary working directory, so that no saved hardware profile of the
machine running the tests (``policies/hardware-*.yaml``) changes what the planner chooses.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, write_job

from corpusgen.cli import cli

GIB = 2**30


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_plan_model_prints_policy_and_writes_yaml_that_loads(tmp_path):
    """The headline use of `plan`: OPT-30B on a 16 GiB GPU. It must say which profile it used (the
    built-in H200 one here: no saved profile, and the test machine may have no GPU), print the
    placements, the throughput and memory per tier, and write a YAML that `run --policy FILE`
    reads back to the same policy, which fits the budgets."""
    from corpusgen.engine.config import preset
    from corpusgen.planner.memory import memory_per_tier
    from corpusgen.planner.policy import load_policy

    out = tmp_path / "opt30.yaml"
    r = invoke("plan", "--model", "opt-30b", "--dummy", "--gpu-mem", "16GiB", "--cpu-mem", "110GiB", "-o", out)
    assert r.exit_code == 0, r.output
    for needle in ("plan for opt-30b", "builtin h", "prompt_len 512: the default", "weights", "kv_cache",
                   "prefill", "decode", "total", "GPU", "CPU", "DISK", "ETA", f"wrote {out}"):
        assert needle in r.output, (needle, r.output)
    pol = load_policy(out)
    assert pol.weights.gpu < 1.0, "OPT-30B cannot be resident in 16 GiB"
    mem = memory_per_tier(preset("opt-30b"), pol, 512, 32)
    assert mem.gpu <= 16 * GIB and mem.cpu <= 110 * GIB
    assert out.read_text().startswith("# corpusgen plan for opt-30b")


def test_plan_impossible_budget_is_one_line_with_the_shortfall():
    """Infeasible budgets are a user error: exit 1, one line naming the tier that is short and by
    how much (the BudgetError), never a traceback."""
    r = invoke("plan", "--model", "opt-30b", "--gpu-mem", "1GiB", "--cpu-mem", "2GiB")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no policy fits opt-30b"), r.output
    assert "budget short by" in lines[0] and "GiB" in lines[0]


def test_plan_job_on_cpu_takes_rows_from_parquet_and_gives_eta(tmp_path, corpus):
    """`plan JOB.yaml` plans what `run` would do: on a CPU the resident policy with blocks of 32;
    gen_len from max_new_tokens, rows from the Parquet footer, hence an ETA."""
    job = write_job(tmp_path, model="opt-125m", engine={"device": "cpu"}, generation={"max_new_tokens": 16})
    r = invoke("plan", job)
    assert r.exit_code == 0, r.output
    assert "CPU-only machine" in r.output and "blocks of 32 × 1" in r.output and "no offload" in r.output
    assert "gen_len 16: the job's generation.max_new_tokens" in r.output
    assert "rows 40: the input's row count" in r.output and "ETA: 40 rows × 16 tokens" in r.output
    r = invoke("plan", job, "--model", "opt-125m")
    assert r.exit_code == 2 and "JOB.yaml or --model" in r.output


def test_bench_with_policy_file_prints_throughput_and_appends_json(tmp_path):
    """`bench` runs the real engine end to end (tiny: OPT-125M dummy weights on the CPU) and
    reports measured beside predicted; the JSON line is what benchmarks/ collects (with the
    prediction, since a profile was asked for)."""
    pol = tmp_path / "pol.yaml"
    pol.write_text("gpu_batch_size: 4\nnum_gpu_batches: 1\n")
    results = tmp_path / "res" / "results.jsonl"
    r = invoke("bench", "--model", "opt-125m", "--dummy", "--device", "cpu", "--prompt-len", 16, "--gen-len", 4,
               "--num-seqs", 4, "--policy", pol, "--results", results, "--label", "cli-test", "--profile", "h200")
    assert r.exit_code == 0, r.output
    for needle in ("prefill (prompt tok/s)", "decode (tok/s)", "total (tok/s)", "decode step (s)",
                   "peak pinned CPU", "measured", "predicted", f"appended to {results}"):
        assert needle in r.output, (needle, r.output)
    lines = results.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["label"] == "cli-test" and rec["num_seqs"] == 4 and rec["gen_len"] == 4
    assert rec["policy"]["gpu_batch_size"] == 4 and rec["total_tps"] > 0 and rec["predicted_tps"] > 0
    assert rec["decode_graphs"] is None and "CUDA graphs" not in r.output  # CUDA only


def test_profile_cpu_writes_yaml_and_reuses_it(tmp_path):
    """`profile` measures and saves a YAML the planner loads; a second call reuses it instead of
    spending another measurement (only --remeasure measures again)."""
    from corpusgen.planner.hardware import load_profile

    out = tmp_path / "hw.yaml"
    r = invoke("profile", "--device", "cpu", "--out", out, "--quick")
    assert r.exit_code == 0, r.output
    prof = load_profile(out)
    assert prof.device_name.startswith("cpu-") and prof.h2d_pinned_gbps > 0 and prof.gpu_matmul
    assert f"saved {out}" in r.output and "host→GPU" in r.output
    r = invoke("profile", "--device", "cpu", "--out", out)
    assert r.exit_code == 0 and f"reused {out}" in r.output


def test_run_policy_auto_plans_resident_batch_on_cpu_and_records_prediction(tmp_path, corpus, fake_factory):
    """`engine.policy: auto` on a CPU without budgets gives the resident policy with blocks of 32
    (quickly: no LP), and with a profile of this machine saved, the predicted throughput lands in
    the runs table so that `status` shows it beside the measured one."""
    from corpusgen.planner.hardware import BUILTIN, default_path, save_profile
    from corpusgen.job.runner import run_job
    from corpusgen.job.spec import load_spec

    save_profile(BUILTIN["h200"].replace(device_name=f"cpu-{socket.gethostname()}"), default_path(None))
    seen = {}

    def factory(model, **kw):
        seen.update(kw)
        return fake_factory(model, **kw)

    job = write_job(tmp_path, model="opt-125m", engine={"device": "cpu"}, generation={"max_new_tokens": 32})
    out = tmp_path / "out"
    summary = run_job(load_spec(job), output_dir=out, dummy=True, engine_factory=factory, plan_auto=True)
    assert summary.rows == 40
    pol = seen["policy"]
    assert pol.gpu_batch_size == 32 and pol.num_gpu_batches == 1 and pol.weights.gpu == 1.0
    r = invoke("status", out)
    assert r.exit_code == 0 and "predicted tok/s" in r.output, r.output
    r = invoke("sql", out, "SELECT predicted_tps, engine FROM runs", "--format", "json")
    (row,) = json.loads(r.output)
    plan = json.loads(row["engine"])["plan"]
    assert row["predicted_tps"] > 0 and plan["recorded"] and plan["seconds"] < 3.0
    assert plan["prompt_len"] % 64 == 0 and plan["gen_len"] == 32


def test_help_of_every_command_does_not_import_torch():
    """`corpusgen --help` (and each command's --help, the new ones included) must stay instant:
    no torch, no cvxpy at import or help time."""
    code = ("import sys\nfrom corpusgen.cli import cli\n"
            "for args in (['--help'], *([c, '--help'] for c in cli.commands)):\n"
            "    try:\n        cli(args)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'cvxpy', 'pyarrow') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    for name in ("profile", "plan", "bench"):
        assert name in out.stdout


def test_bench_table_reports_decode_graphs():
    """The bench table says how many decode steps were CUDA graph replays when there were any."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from corpusgen.cli.machine import _render_bench

    rec = {"prefill_tps": 1.0, "decode_tps": 2.0, "total_tps": 3.0, "decode_step_s": 0.01, "decode_step_link_s": 0.0,
           "decode_step_link_bytes": 0, "peak_gpu_gib": 1.0, "peak_pinned_gib": 0.0, "disk_gib": 0.0, "load_s": 1.0,
           "generate_wall_s": 2.0, "decode_graphs": {"captures": 1, "replays": 29, "capture_s": 0.03}}
    report = SimpleNamespace(plan=SimpleNamespace(memory=SimpleNamespace(gpu=0, cpu=0, disk=0)), prefill_tps=1.0,
                             decode_tps=2.0, throughput=3.0, profile=SimpleNamespace(this_machine=True, source="x"))
    out = io.StringIO()
    _render_bench(Console(file=out, width=120), rec, report)
    assert "29 replays, 1 captures" in out.getvalue()
