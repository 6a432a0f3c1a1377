"""Distributed helpers: single-process fallback, sharding, and a real 2-process gloo run (reductions, DDP
gradients, and a Fast-BAT-like bi-level loss whose inner gradient uses the unwrapped module)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

from applications.adversarial.distributed import (
    DistContext,
    all_gather_object,
    barrier,
    broadcast_object,
    cleanup,
    reduce_mean,
    reduce_sum,
    setup,
    shard,
    unwrap,
    wrap_model,
)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _clear_env(monkeypatch):
    for k in _ENV:
        monkeypatch.delenv(k, raising=False)


def test_single_process_without_torchrun_env(monkeypatch):
    _clear_env(monkeypatch)
    ctx = setup("cpu")
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), enabled=False)
    assert ctx.is_main
    model = nn.Linear(3, 2)
    assert wrap_model(model, ctx) is model and unwrap(model) is model
    t = torch.arange(4.0)
    assert reduce_sum(t, ctx) is t and reduce_mean(t, ctx) is t
    idx = torch.randperm(11)
    assert shard(idx, ctx) is idx
    assert broadcast_object({"a": 1}, ctx) == {"a": 1}
    assert all_gather_object(5, ctx) == [5]
    barrier(ctx)
    cleanup(ctx)
    auto = setup("auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu") and not auto.enabled


def test_world_size_one_is_single_process(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not setup("cpu").enabled


def test_incomplete_torchrun_env_is_an_error(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK"):
        setup("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        setup("cpu")


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (7, 2), (5, 5)])
def test_shard_is_disjoint_equal_and_batch_aligned(n, world):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [shard(perm, DistContext(r, world, r, torch.device("cpu"), True)) for r in range(world)]
    per = n // world
    assert all(s.numel() == per for s in shards)
    flat = torch.cat(shards)
    assert flat.unique().numel() == flat.numel()               # disjoint
    assert set(flat.tolist()) == set(perm[: per * world].tolist())  # the remainder (tail) is what is dropped
    # union over ranks of local batch j == global batch j of size B * W (strided sharding)
    b = 1
    for j in range(per // b):
        union = torch.cat([s[j * b:(j + 1) * b] for s in shards])
        assert sorted(union.tolist()) == sorted(perm[j * b * world:(j + 1) * b * world].tolist())
    # evaluation mode keeps everything, sizes differ by at most one
    full = [shard(perm, DistContext(r, world, r, torch.device("cpu"), True), drop_remainder=False) for r in range(world)]
    assert sorted(torch.cat(full).tolist()) == sorted(perm.tolist())
    assert max(s.numel() for s in full) - min(s.numel() for s in full) <= 1


def test_shard_rejects_bad_input():
    ctx = DistContext(0, 4, 0, torch.device("cpu"), True)
    with pytest.raises(ValueError, match="1-D"):
        shard(torch.zeros(2, 3, dtype=torch.long), ctx)
    with pytest.raises(ValueError, match="3 indices over 4 ranks"):
        shard(torch.arange(3), ctx)


# ------------------------------------------------------------------------------- real 2-process gloo run
_WORKER = textwrap.dedent(
    r"""
    import copy, sys
    import torch
    import torch.nn.functional as F
    from torch import nn
    from applications.adversarial.distributed import (
        all_gather_object, barrier, broadcast_object, cleanup, reduce_mean, reduce_sum, setup, unwrap, wrap_model)

    out_dir = sys.argv[1]
    torch.set_default_dtype(torch.float64)
    ctx = setup("cpu")
    r, W = ctx.rank, ctx.world_size
    res = {"rank": r, "world_size": W, "enabled": ctx.enabled}
    res["sum"] = reduce_sum(torch.tensor([r + 1.0, 10.0 * (r + 1)]), ctx)
    res["mean"] = reduce_mean(torch.tensor([r + 1.0, 10.0 * (r + 1)]), ctx)
    res["int_sum"] = reduce_sum(torch.tensor([r + 1]), ctx)
    src_value = torch.tensor([float(r)])
    reduce_sum(src_value, ctx)
    res["input_untouched"] = src_value.item() == float(r)
    res["bcast"] = broadcast_object({"from": r}, ctx)
    res["gathered"] = all_gather_object(r, ctx)

    # the same initial model on every rank (DDP would broadcast rank 0's anyway); per-rank data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(100 + r)
    x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    delta0 = 0.1 * torch.randn(5, 6, generator=g)
    ddp = wrap_model(model, ctx)
    assert unwrap(ddp) is model and ddp is not model

    def grads(m):
        return [p.grad.detach().clone() for p in m.parameters()]

    # 1) plain loss
    F.cross_entropy(ddp(x), y).backward()
    res["ddp_plain"] = grads(ddp)
    F.cross_entropy(ref(x), y).backward()
    res["ref_plain"] = grads(ref)

    # 2) bi-level loss: delta(theta) = delta0 + a * grad_delta CE_sum(theta, x + delta0), kept in the graph
    def bilevel_loss(outer, inner, first_order=False):
        d0 = delta0.clone().requires_grad_(True)
        inner_loss = F.cross_entropy(inner(x + d0), y, reduction="sum")
        (gd,) = torch.autograd.grad(inner_loss, d0, create_graph=not first_order)
        delta = d0 + 0.5 * gd
        if first_order:
            delta = delta.detach()
        return F.cross_entropy(outer(x + delta), y)

    ddp.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    bilevel_loss(ddp, unwrap(ddp)).backward()
    res["ddp_bilevel"] = grads(ddp)
    bilevel_loss(ref, ref).backward()
    res["ref_bilevel"] = grads(ref)
    ref.zero_grad(set_to_none=True)
    bilevel_loss(ref, ref, first_order=True).backward()
    res["ref_first_order"] = grads(ref)

    barrier(ctx)
    torch.save(res, f"{out_dir}/rank{r}.pt")
    cleanup(ctx)
    """
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "worker.py"
    script.write_text(_WORKER)
    world = 2
    base = {k: v for k, v in os.environ.items() if k not in _ENV}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp)],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


def test_two_ranks_reductions(two_rank_results):
    for r, res in enumerate(two_rank_results):
        assert res["rank"] == r and res["world_size"] == 2 and res["enabled"]
        assert res["sum"].tolist() == [3.0, 30.0]
        assert res["mean"].tolist() == [1.5, 15.0]
        assert res["int_sum"].tolist() == [3]
        assert res["input_untouched"]
        assert res["bcast"] == {"from": 0}
        assert res["gathered"] == [0, 1]


def _close(a, b, tol=1e-12):
    return all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["plain", "bilevel"])
def test_ddp_gradient_is_average_of_per_rank_gradients(two_rank_results, kind):
    per_rank = [res[f"ref_{kind}"] for res in two_rank_results]
    average = [(a + b) / 2 for a, b in zip(*per_rank)]
    assert not _close(per_rank[0], per_rank[1], 1e-6)  # ranks really saw different data
    for res in two_rank_results:
        assert _close(res[f"ddp_{kind}"], average), kind


def test_bilevel_term_is_present(two_rank_results):
    """The implicit term (through create_graph) changes the gradient: the bi-level check is not vacuous."""
    for res in two_rank_results:
        diff = max((a - b).abs().max().item() for a, b in zip(res["ref_bilevel"], res["ref_first_order"]))
        assert diff > 1e-4
