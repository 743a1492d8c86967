"""Budgets are checked against the machine (issue 28, item 8): `bench --cpu-mem 110GiB` on a 23 GiB
machine used to start and be killed by the kernel's OOM killer; `plan` accepted it too. A GPU
budget over the GPU's memory, a CPU budget over physical memory, or a disk tier over the offload
directory's free space is refused up front by `plan`, `bench` and `run`, in one line naming what
the machine has (corpusgen.planner.budgets.check_against_machine)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import fake_engine
from conftest import write_job
from corpusgen.cli import cli
from corpusgen.errors import BudgetError
from corpusgen.job.runner import run_job
from corpusgen.job.spec import load_spec
from corpusgen.planner import budgets

HUGE = "10TiB"


def _one_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("option", ["--cpu-mem", "--gpu-mem"])
def test_plan_refuses_a_budget_over_this_machine(option):
    """`plan --device cpu` plans for this machine: a budget over its physical memory is refused,
    naming how much it has (on a CPU the GPU tier is host memory too)."""
    r = CliRunner().invoke(cli, ["plan", "--model", "opt-125m", "--device", "cpu", option, HUGE])
    _one_line(r, "10,240.0 GiB", "more than this machine has", f"{budgets.host_memory() / 2**30:,.1f} GiB")


def test_plan_for_another_machine_checks_that_machine(monkeypatch):
    """Without a GPU here, `plan` plans for the profile's machine (docs/cli.md's example, 110 GiB
    on the built-in H200 profile, stays valid); a budget over that machine's memory is refused."""
    monkeypatch.setattr("corpusgen.planner.plan.cuda_name", lambda: None)
    ok = CliRunner().invoke(cli, ["plan", "--model", "opt-30b", "--profile", "h200", "--device", "cuda",
                                  "--gpu-mem", "16GiB", "--cpu-mem", "110GiB"])
    assert ok.exit_code == 0, ok.output
    r = CliRunner().invoke(cli, ["plan", "--model", "opt-30b", "--profile", "h200", "--device", "cuda",
                                 "--gpu-mem", "16GiB", "--cpu-mem", HUGE])
    _one_line(r, "more than the planned machine (NVIDIA H200")


def test_bench_refuses_a_budget_over_this_machine(tmp_path):
    """`bench` refuses before loading anything (nothing is appended to the results file)."""
    results = tmp_path / "results.jsonl"
    r = CliRunner().invoke(cli, ["bench", "--model", "opt-125m", "--dummy", "--device", "cpu", "--cpu-mem", HUGE,
                                 "--prompt-len", "8", "--gen-len", "2", "--results", str(results)])
    _one_line(r, "CPU budget 10,240.0 GiB", "more than this machine has")
    assert not results.exists()


def test_run_refuses_a_budget_over_this_machine_before_touching_the_output(tmp_path, corpus):
    """`run` with engine.cpu_memory (or gpu_memory on a CPU) over the machine is refused before the
    output directory is created or the engine loads."""
    for field in ("cpu_memory", "gpu_memory"):
        job = write_job(tmp_path, engine={"device": "cpu", field: HUGE})
        with pytest.raises(BudgetError, match=r"budget 10,240.0 GiB .* is more than this machine has"):
            run_job(load_spec(job), output_dir=tmp_path / "out", engine_factory=fake_engine.open_engine)
        assert not (tmp_path / "out").exists()


def test_disk_tier_over_the_free_space_is_refused_before_loading(tmp_path, monkeypatch):
    """A policy whose disk tier needs more than the offload directory's free space is refused by
    open_engine before any weight is written there."""
    from corpusgen.engine.load import open_engine
    from corpusgen.planner.policy import Policy, Placement

    monkeypatch.setattr(budgets, "disk_free", lambda d: 2**20)
    with pytest.raises(BudgetError, match=r"puts .* GiB of weights on disk but .* has 0.0 GiB free"):
        open_engine("opt-125m", dummy=True, device="cpu", offload_dir=str(tmp_path / "off"),
                    policy=Policy(weights=Placement(gpu=0.0, cpu=0.0)))
    assert not (tmp_path / "off").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_budget_over_the_gpu_is_refused():
    """On a GPU machine, a GPU budget over the card's memory is refused, naming the card."""
    import torch

    r = CliRunner().invoke(cli, ["plan", "--model", "opt-125m", "--device", "cuda", "--gpu-mem", HUGE])
    _one_line(r, "more than the GPU has", torch.cuda.get_device_name())
