"""Smoke tests of the benchmark scripts: each runs at tiny scale in a subprocess and writes its JSON.

The numbers are checked for shape and sanity (and, where an oracle exists, for value: the CG hypergradient
of a small ridge problem converges, the official-sequence Fast-BAT baseline computes the same gradient as
``FastBAT.official``). The benchmarks themselves are not part of the test suite.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import reproduce_table1, step_cost  # noqa: E402

CIFAR = Path(os.environ.get("BILEVEL_CIFAR10", Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpg.tar.gz"))


def _run(args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=str(REPO), timeout=timeout, env=env)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _machine_ok(machine):
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1
    assert machine["torch_version"] == torch.__version__


def test_hypergrad_ridge_quick(tmp_path):
    out = tmp_path / "ridge.json"
    _run(["benchmarks/hypergrad_ridge.py", "--quick", "--sizes", "small", "--dtypes", "float64", "--repeats", "2",
          "--warmup", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    _machine_ok(data["machine"])
    (problem,) = data["problems"]
    assert problem["dtype"] == "float64" and problem["d"] == 20
    rows = {(r["method"], r["config"]): r for r in problem["rows"]}
    for r in rows.values():
        assert r["median_ms"] > 0 and r["cpu_median_ms"] >= 0 and r["repeats"] == 2
    # d = 20: CG(20) is exact in exact arithmetic; the float64 oracle agrees to near machine precision
    assert rows[("bilevel Implicit(CG)", "CG(20)")]["rel_error"] < 1e-8
    assert rows[("hand-written CG", "CG(20)")]["rel_error"] < 1e-8
    assert rows[("bilevel Implicit(CG)", "CG(10)")]["rel_error"] > rows[("bilevel Implicit(CG)", "CG(20)")]["rel_error"]
    assert set(problem["ratio_ours_vs_handwritten"]["median_ms"]) == {"10", "20"}
    fastest = {(r["method"], r["config"]): r for r in problem["fastest_to_1e-5"]}
    ours = fastest[("bilevel Implicit(CG)", "CG(k)")]
    assert ours["iterations"] is not None and ours["iterations"] <= 20 and ours["rel_error"] <= 1e-5
    if ("Betty 0.2.1 cg", "cg_iterations=20") in rows:  # betty importable: its released CG is off
        assert rows[("Betty 0.2.1 cg", "cg_iterations=20")]["rel_error"] > 1e-3


def test_step_cost_tiny(tmp_path):
    out = tmp_path / "step.json"
    methods = "standard,fast_at,fast_bat exact IG (lam=1/step),fast_bat no IG (lam=inf),fast_bat official pass sequence"
    _run(["benchmarks/step_cost.py", "--tiny", "--no-memory", "--repeats", "2", "--warmup", "1", "--methods", methods,
          "--out", str(out)])
    data = json.loads(out.read_text())
    _machine_ok(data["machine"])
    (model,) = data["models"]
    rows = {r["method"]: r for r in model["rows"]}
    assert set(rows) == set(methods.split(","))
    assert rows["fast_at"]["ratio_to_fast_at"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["median_ms"] > 0 and r["peak_mem_mib"] is None
    assert set(model["targets"]) == {"exact_ig_over_fast_at", "exact_ig_over_official_sequence", "no_ig_over_fast_at"}


def test_step_cost_tiny_bf16_channels_last(tmp_path):
    out = tmp_path / "step_bf16.json"
    methods = "fast_at,fast_bat exact IG (lam=1/step),fast_bat official pass sequence"
    _run(["benchmarks/step_cost.py", "--tiny", "--repeats", "2", "--warmup", "1", "--methods", methods,
          "--amp", "bf16", "--channels-last", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["amp"] == "bf16" and data["channels_last"] is True
    rows = {r["method"]: r for r in data["models"][0]["rows"]}
    assert set(rows) == set(methods.split(",")) and rows["fast_at"]["ratio_to_fast_at"] == pytest.approx(1.0)
    # CPU peak memory is measured for the default float32 layout only
    assert all(r["median_ms"] > 0 and r["peak_mem_mib"] is None for r in rows.values())


def test_step_cost_cpu_memory_child_reports_a_nonnegative_peak():
    mem = step_cost.cpu_peak_child("small_cnn", "fast_at", tiny=True)
    assert mem["base_mib"] > 0 and mem["peak_increase_mib"] >= 0


def test_official_sequence_baseline_computes_fastbat_official_gradient():
    """The re-implemented official pass sequence and FastBAT.official give the same gradient (float64)."""
    from applications.adversarial.methods import FastBAT
    from applications.adversarial.models import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 0.5, 0.5, width=4, hidden=16).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 10, 10, generator=gen, dtype=torch.float64)
    x[0, 0, :3] = 0.0  # pixels on the box bounds
    y = torch.randint(0, 10, (6,), generator=gen)
    eps = 8 / 255

    step_cost.official_style_fast_bat_grads(model, x, y, eps=eps, generator=torch.Generator().manual_seed(7))
    official = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss, _ = FastBAT.official(eps).loss(model, x, y, generator=torch.Generator().manual_seed(7))
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(official, ours):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # and the implicit term is present (differs from the no-IG gradient)
    model.zero_grad(set_to_none=True)
    loss, _ = FastBAT(eps=eps, lam=float("inf")).loss(model, x, y, generator=torch.Generator().manual_seed(7))
    loss.backward()
    assert any(not torch.allclose(p.grad, b, rtol=1e-6, atol=1e-10) for p, b in zip(model.parameters(), ours))


def test_make_tiny_archive_keeps_k_images_per_class(tmp_path):
    src = tmp_path / "src.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for split, n in (("train", 5), ("test", 3)):
            for cls in ("a", "b", "c"):
                for i in range(n):
                    payload = f"{split}{cls}{i}".encode()
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    dest = reproduce_table1.make_tiny_archive(src, tmp_path / "tiny.tar", train_per_class=2, test_per_class=1)
    with tarfile.open(dest) as tar:
        names = [m.name for m in tar if m.isfile()]
    assert sorted(n.rsplit("/", 1)[0] for n in names) == sorted(
        [f"train/{c}" for c in "abc" for _ in range(2)] + [f"test/{c}" for c in "abc"])


def test_reproduce_table1_tiny(tmp_path):
    missing = reproduce_table1.missing_configs()
    if missing:
        pytest.skip(f"the Table 1 configs are not written yet (applications/adversarial/configs/: {', '.join(missing)})")
    if not CIFAR.exists():
        pytest.skip(f"CIFAR-10 JPEG tarball not found at {CIFAR} (set BILEVEL_CIFAR10)")
    out = tmp_path / "table1_tiny.json"
    _run(["benchmarks/reproduce_table1.py", "--tiny", "--data", str(CIFAR), "--runs", "fast_bat_16_lam_exact",
          "--out-dir", str(tmp_path / "runs"), "--results", str(out)], timeout=300)
    data = json.loads(out.read_text())
    assert data["tiny"] is True
    (row,) = data["rows"]
    assert row["run"] == "fast_bat_16_lam_exact" and row["seeds"] == 1
    (rec,) = data["records"]
    assert rec["exit_code"] == 0 and rec["s_per_epoch"] > 0 and rec["train_time_s"] > 0
    for which in ("best", "last"):
        r = rec[which]
        for metric in ("SA", "RA-PGD", "RA-AA"):
            assert 0.0 <= r[metric] <= 100.0
    assert out.with_suffix(".md").read_text().count("fast_bat_16_lam_exact") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_session_script_parses_and_refuses_without_cuda(tmp_path):
    script = REPO / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RESULTS": str(tmp_path)}
    out = subprocess.run(["bash", str(script), "steps"], capture_output=True, text=True, cwd=str(REPO), env=env,
                         timeout=120)
    assert out.returncode != 0 and "no CUDA device" in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_step_profile_tiny_counts_the_double_backward(tmp_path):
    """The implicit term adds, per step of the two-convolution CNN, one full convolution backward per layer (the
    backward at z) and nothing to the forwards."""
    out = tmp_path / "profile.json"
    _run(["benchmarks/step_profile.py", "--tiny", "--steps", "2", "--out", str(out)])
    (model,) = json.loads(out.read_text())["models"]
    ops = {r["op"]: r for r in model["ops"]}
    conv_bwd = ops["aten::convolution_backward"]
    assert conv_bwd["no_ig_calls"] == 6 and conv_bwd["exact_calls"] == 8
    assert ops["aten::conv2d"]["exact_calls"] == ops["aten::conv2d"]["no_ig_calls"] == 6  # 3 forwards x 2 convs
    # times are reported, not asserted (on a loaded machine the exact-minus-no-IG difference can be negative)
    assert math.isfinite(model["implicit_term_ms"])
    assert all(math.isfinite(r) and r > 0 for r in model["ratios_to_fast_at"].values())


def test_fast_bat_official_updates_batchnorm_like_the_official_pass_sequence():
    """With update_bn_on_attack=True (FastBAT.official) BatchNorm's running statistics after one step are
    the official code's: its four train-mode forwards (at z0, at z, at delta* for the training loss's input
    gradient, at delta* for the direct gradient), on a small BN CNN in float64; the gradients agree too."""
    from torch import nn

    from applications.adversarial.methods import FastBAT

    def bn_cnn() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.Flatten(), nn.Linear(6 * 5 * 5, 10)).double().train()

    gen = torch.Generator().manual_seed(3)
    x = torch.rand(8, 1, 10, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=gen)
    eps = 8 / 255
    official = bn_cnn()
    step_cost.official_style_fast_bat_grads(official, x, y, eps=eps, generator=torch.Generator().manual_seed(7))
    ours = bn_cnn()
    loss, _ = FastBAT.official(eps).loss(ours, x, y, generator=torch.Generator().manual_seed(7))
    loss.backward()
    buffers = dict(ours.named_buffers())
    assert int(buffers["1.num_batches_tracked"]) == 4
    for name, expected in official.named_buffers():
        torch.testing.assert_close(buffers[name], expected, rtol=1e-12, atol=1e-14, msg=name)
    for p, q in zip(ours.parameters(), official.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


def test_stochastic_quadratic_tiny(tmp_path):
    """Every method runs 200 iterations on a small instance (an iteration count, not a time budget, so the result
    does not depend on the machine's load); the deterministic Implicit(CG) run converges (its exact metric is an
    oracle), and the single-loop methods have per-iteration timings beside their hand-written loops."""
    out = tmp_path / "stoch.json"
    _run(["benchmarks/stochastic_quadratic.py", "--tiny", "--no-compile", "--iterations", "200", "--out", str(out)])
    data = json.loads(out.read_text())
    _machine_ok(data["machine"])
    assert data["tiny"] is True and data["problem"]["p"] == 20 and data["load_average_start"] is not None
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"SOBA", "F2SA", "BOME", "AmIGO", "StocBiO", "Implicit(CG)", "Unrolled"}
    x0_metric = data["problem"]["grad_norm2_at_x0"]
    for r in runs.values():
        assert r["curve"][0]["grad_norm2"] == pytest.approx(x0_metric) and r["iterations"] > 0
    assert runs["Implicit(CG)"]["final_grad_norm2"] < 1e-6 and runs["Implicit(CG)"]["time_to"]["0.001"] is not None
    assert runs["SOBA"]["best_grad_norm2"] < 1e-1 * x0_metric
    rows = {r["method"]: r for r in data["per_iteration"]}
    assert set(rows) == {"SOBA", "F2SA", "BOME"}
    for r in rows.values():
        assert r["ratio_bilevel_over_hand"] > 0 and r["timings"]["hand-written"]["median_ms"] > 0
    assert out.with_suffix(".png").exists() == _has_matplotlib()


def test_benchopt_quadratic_tiny(tmp_path):
    """benchmarks/benchopt_quadratic.py --tiny without JAX: benchopt's side is skipped with a message, the instance is
    drawn from benchopt's recipe (and says so), and every torch run of the factor chain is recorded."""
    out = tmp_path / "bq.json"
    stdout = _run(["benchmarks/benchopt_quadratic.py", "--tiny", "--out", str(out)])
    assert "benchopt's side skipped" in stdout
    data = json.loads(out.read_text())
    _machine_ok(data["machine"])
    assert data["tiny"] is True and "NOT benchopt's numbers" in data["instance"]["source"]
    x0 = data["instance"]["grad_norm2_at_x0"]
    assert [r["method"] for r in data["rows"]] == ["SOBA", "AmIGO", "StocBiO"]
    for row in data["rows"]:
        assert set(row["runs"]) == {"torch_benchopt", "torch_ours", "ours_instance", "ours_instance_benchopt_steps"}
        assert row["runs"]["torch_benchopt"]["curve"][0][1] == pytest.approx(x0)
        for r in row["runs"].values():
            assert r["iterations"] == 64 and r["ms_per_it_wall"] > 0 and r["ms_per_it_cpu"] > 0
        if row["method"] != "SOBA":  # benchopt's constant steps take the double-loop methods below x0's tenth
            assert min(v for _, v in row["runs"]["torch_benchopt"]["curve"]) < 0.1 * x0
    stocbio = data["rows"][2]["runs"]["torch_benchopt"]["step_config"]
    assert stocbio["terms"] == data["benchopt_hyperparameters"]["StocBiO"]["n_shia_steps"] + 1
    assert out.with_suffix(".md").read_text().count("| AmIGO |") >= 4


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_convergence_check_benchmark_tiny(tmp_path):
    """benchmarks/convergence_check.py --tiny runs and writes the overheads it prints."""
    out = tmp_path / "cc.json"
    stdout = _run(["benchmarks/convergence_check.py", "--tiny", "--out", str(out)], timeout=300)
    data = json.loads(out.read_text())
    assert data["tiny"] is True and set(data["per_step_s"]) == {"none", "every_1"}
    assert data["per_step_s"]["none"]["median_s"] > 0 and "amortized_overhead" in data
    assert "ConvergenceCheck(every=1)" in stdout


def test_stochastic_parallel_benchmark_tiny(tmp_path):
    """benchmarks/stochastic_parallel.py --tiny: one and two gloo processes run and the table and JSON are written."""
    out = tmp_path / "sp.json"
    stdout = _run(["benchmarks/stochastic_parallel.py", "--tiny", "--out", str(out)], timeout=600)
    data = json.loads(out.read_text())
    assert [r["world_size"] for r in data["runs"]] == [1, 2]
    for run in data["runs"]:
        assert set(run["rows"]) == {"soba", "amigo"} and all(r["iterations_per_s"] > 0 for r in run["rows"].values())
    assert 0 < data["runs"][1]["rows"]["soba"]["allreduce_share"] < 1
    assert "all-reduce share" in stdout

