"""``torchrun --nproc_per_node 2`` (gloo, CPU) runs the data-cleaning command data-parallel: the same numbers as
one process with the same global batch, one writer, one error line, and a bit-exact resume after a rank is killed.

The config is tiny and in float64 (200 training samples, global batches of 32, 4 outer steps of every method
and 6 baseline steps), so that the two runs differ only by the order of floating-point sums: measured
max |w_2 - w_1| = 9e-16 over the seven methods (the weights move by 0.2 to 3.7), theta 5e-18, validation
losses equal. The bound 1e-10 leaves room for other BLAS builds; without the average of ``w.grad`` over
the ranks (``Method.average_grad``) the unrolled method's weights differ by 0.4 (checked by hand).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import yaml

from applications.datacleaning.__main__ import main

HERE = Path(__file__).resolve().parent
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TOL = 1e-10
CONFIG = {
    "seed": 0, "dtype": "float64",
    "data": {"n_train": 200, "n_val": 100, "n_test": 100, "p": 0.5},
    "train": {"steps": 4, "eval_every": 2, "batch_size": 32, "val_batch_size": 32, "outer_lr": 0.3,
              "baseline_steps": 6},
    "methods": [{"name": "implicit", "inner_steps": 2, "cg_steps": 2},
                {"name": "unrolled", "inner_steps": 2, "truncate": 2, "unroll_batch": 32},
                {"name": "amigo", "inner_steps": 2, "system_steps": 2},
                {"name": "stocbio", "inner_steps": 2, "neumann_terms": 2},
                {"name": "soba", "step_size": 0.02, "v_step_size": 0.02},
                {"name": "f2sa", "step_size": 0.02},
                {"name": "bome", "inner_steps": 2}],
}
METHODS = [m["name"] for m in CONFIG["methods"]]
#: rank 1's evaluation at which the kill test stops it: stocbio's second (3 evaluations per method).
KILL_AT = 11

gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                          reason="torch.distributed with gloo is not available")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the runs set cpu_threads: 1
    yield
    torch.set_num_threads(threads)


def config(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output": {"dir": str(tmp), "name": name}}))
    return path


def torchrun(tmp: Path, name: str, *overrides: str, faults: bool = False, **env: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 -m applications.datacleaning ...`` (or the
    fault-injecting script, with ``DC_KILL_RANK`` / ``DC_KILL_AT`` in ``env``)."""
    target = [str(HERE / "_dc_faults.py"), "0"] if faults else ["-m", "applications.datacleaning"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target,
           "--no-progress", "--config", str(config(tmp, name)), *overrides]
    return subprocess.run(cmd, env={**ENV, **env}, capture_output=True, text=True, timeout=240)


def our_lines(stderr: str) -> List[str]:
    """The command's own messages, without torchrun's report and the warnings."""
    return [line for line in stderr.splitlines() if re.match(r"(error|interrupted by)", line)]


def state(run_dir: Path) -> Dict[str, Any]:
    return torch.load(run_dir / "state.pt", weights_only=True)


def records(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in run["history"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process run (in this process) and the two-process run of the same config."""
    tmp = tmp_path_factory.mktemp("dc_dist")
    threads = torch.get_num_threads()
    try:
        assert main(["--no-progress", "--config", str(config(tmp, "one"))]) == 0
    finally:
        torch.set_num_threads(threads)
    proc = torchrun(tmp, "two")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return tmp, proc


@pytest.mark.slow
@gloo
def test_two_processes_equal_one_with_the_same_global_batch(runs):
    tmp, proc = runs
    one, two = state(tmp / "one"), state(tmp / "two")
    w0 = torch.zeros(200, dtype=torch.float64)
    for name in METHODS:
        a, b = two["runs"][name], one["runs"][name]
        assert a["w"].dtype == torch.float64 and a["step"] == b["step"] == 4
        assert (a["w"] - b["w"]).abs().max() <= TOL, name
        assert (b["w"] - w0).abs().max() > 0.1, name  # not vacuous: the weights moved
        theta_a, theta_b = a["method"]["theta"], b["method"]["theta"]
        assert all((theta_a[k] - theta_b[k]).abs().max() <= TOL for k in theta_b), name
        for ra, rb in zip(a["history"], b["history"], strict=True):
            for key in ("val_loss", "test_acc", "auc", "precision", "recall"):
                assert ra[key] == pytest.approx(rb[key], abs=TOL), (name, key)
    for name in ("unweighted", "oracle"):
        for key in ("val_loss", "test_acc"):
            assert two["baselines"][name][key] == pytest.approx(one["baselines"][name][key], abs=TOL)
    res_two, res_one = (json.loads((tmp / n / "results.json").read_text()) for n in ("two", "one"))
    assert res_two["world_size"] == 2 and res_one["world_size"] == 1
    # rank 0 alone logs: one table, one note on the processes, and nothing on stderr but warnings
    assert proc.stdout.count("| method |") == 1 and proc.stdout.count("2 processes:") == 1
    assert our_lines(proc.stderr) == [] and "Traceback" not in proc.stderr


@pytest.mark.slow
@gloo
def test_a_killed_rank_stops_the_run_with_one_line_and_the_resume_is_bit_exact(runs):
    tmp, _ = runs
    killed = torchrun(tmp, "kill", faults=True, DC_KILL_RANK="1", DC_KILL_AT=str(KILL_AT))
    assert killed.returncode != 0
    lines = our_lines(killed.stderr)  # rank 0: SIGTERM from torchrun, or the lost connection if it came first
    assert len(lines) == 1 and "the last checkpoint" in lines[0] and "resume with: torchrun" in lines[0], \
        killed.stderr[-3000:]
    assert str(HERE.parents[1] / "applications") not in killed.stderr  # no traceback of the command's code
    partial = state(tmp / "kill")["runs"]
    assert partial["amigo"]["step"] == 4 and partial["stocbio"]["step"] < 4 and "soba" not in partial
    resumed = torchrun(tmp, "kill")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    done, ref = state(tmp / "kill"), state(tmp / "two")
    for name in METHODS:
        a, b = done["runs"][name], ref["runs"][name]
        assert torch.equal(a["w"], b["w"]), name
        assert all(torch.equal(a["method"]["theta"][k], b["method"]["theta"][k]) for k in b["method"]["theta"])
        assert records(a) == records(b), name


@pytest.mark.slow
@gloo
def test_an_error_on_the_ranks_is_one_line_and_the_exit_status_of_every_rank(tmp_path):
    odd = torchrun(tmp_path, "odd", "train.batch_size=33")
    assert our_lines(odd.stderr) == ["error: invalid configuration (1 problem):"], odd.stderr[-3000:]
    (tmp_path / "file").write_text("")  # rank 0 alone takes the run directory: its error stops rank 1 too
    busy = torchrun(tmp_path, "busy", "output.name=file")
    assert our_lines(busy.stderr) == [f"error: run directory {tmp_path / 'file'} is a file; choose another "
                                      "output.dir / output.name"], busy.stderr[-3000:]
    assert "train.batch_size=33 (the global batch) must be divisible by the number of processes 2" in odd.stderr
    diverged = torchrun(tmp_path, "nan", "dtype=float32", "train.steps=20", "baselines=false",
                        "methods=[{name: soba, step_size: 1.0e+6, v_step_size: 1.0e+6}]")
    assert our_lines(diverged.stderr) == ["error: soba: the validation loss is nan at step 12; lower the method's "
                                          "step sizes"], diverged.stderr[-3000:]
    for proc, code in ((odd, 2), (busy, 2), (diverged, 3)):  # torchrun's report: rank 0 first, with the command's status
        assert proc.returncode != 0 and str(HERE.parents[1] / "applications") not in proc.stderr
        root = proc.stderr.split("Root Cause")[1]
        assert "rank      : 0" in root and f"exitcode  : {code} " in root, proc.stderr[-2000:]


def test_the_error_policy_of_the_ranks():
    """What a rank other than 0 leaves silently with (rank 0 reports it), and the one-process fallbacks."""
    import signal

    from applications.common.config import ConfigError
    from applications.common.distributed import (
        DistContext,
        StoppedElsewhere,
        agree,
        leave_silently,
        on_main,
        peer_lost,
        peer_lost_reason,
        silent_exit_code,
    )
    from applications.common.interrupts import Interrupted
    from applications.datacleaning.config import check_world_size, config_from_dict
    from applications.datacleaning.runner import MethodDiverged

    gloo_error = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                              "[127.0.0.1]:49383. This is typically caused by a remote worker crashing.")
    cases = [(StoppedElsewhere(3), 3), (Interrupted(signal.SIGTERM), 143), (KeyboardInterrupt(), 130),
             (MethodDiverged("nan"), 3), (ConfigError(["x"]), 2), (OSError("disk"), 2), (gloo_error, 4),
             (RuntimeError("a bug"), None), (ValueError("a bug"), None)]
    assert [silent_exit_code(exc) for exc, _ in cases] == [code for _, code in cases]
    assert peer_lost(gloo_error) and not peer_lost(RuntimeError("a bug"))
    assert peer_lost_reason(gloo_error) == "Connection closed by peer [127.0.0.1]:49383"
    assert leave_silently(2, grace_s=0.0) == 2
    single = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), enabled=False)
    assert on_main(single, lambda: 5) == 5 and agree(single, lambda: 6) == 6
    with pytest.raises(OSError, match="disk"):
        on_main(single, lambda: (_ for _ in ()).throw(OSError("disk")))
    cfg = config_from_dict({"train": {"batch_size": 30, "val_batch_size": 32},
                            "methods": [{"name": "unrolled", "unroll_batch": 50}, "soba"]})
    check_world_size(cfg, 2)
    with pytest.raises(ConfigError) as err:
        check_world_size(cfg, 4)
    assert err.value.problems == [
        "train.batch_size=30 (the global batch) must be divisible by the number of processes 4",
        "methods[0].unroll_batch=50 (the global batch) must be divisible by the number of processes 4"]
