r"""Data-parallel stochastic methods (:class:`bilevel.stochastic.DataParallel`): two gloo processes with batch b each
equal one process with batch 2b built from the same samples, after 20 iterations of every method (float64); a
run checkpointed by rank 0 and restored on every rank continues bit for bit."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import bilevel as bl
from bilevel.stochastic import DataParallel

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one_process_with_the_concatenated_batch(tmp_path):
    port, two, one = _free_port(), tmp_path / "two.pt", tmp_path / "one.pt"
    script = str(HERE / "_parallel_run.py")
    ranks = [subprocess.Popen([sys.executable, script, str(r), "2", str(port), str(two)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    single = subprocess.run([sys.executable, script, "0", "1", "0", str(one)], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for p in ranks:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    a, b = torch.load(two), torch.load(one)
    assert set(a) == {"soba", "f2sa", "bome", "torch_optim_implicit", "torch_optim_first_order", "amigo", "stocbio",
                      "sgd_unrolled", "soba_resumed"}
    for key, value in a["soba_resumed"].items():  # stopped, saved by rank 0, restored by both: a replay
        assert (value is None and a["soba"][key] is None) or torch.equal(value, a["soba"][key]), key
    for method in a:
        for key, value in a[method].items():
            if value is None:
                assert b[method][key] is None, (method, key)
                continue
            assert value.abs().max() > 0, (method, key)
            torch.testing.assert_close(value, b[method][key], rtol=1e-10, atol=1e-12, msg=f"{method}.{key}")


def test_data_parallel_needs_an_initialized_group_and_a_divisible_batch():
    if not (dist.is_available() and dist.is_initialized()):
        with pytest.raises(RuntimeError, match="not initialized"):
            DataParallel()

    class Two:
        world_size, rank = 2, 1

    with pytest.raises(ValueError, match="not divisible"):
        bl.RandomBatches(10, 5, parallel=Two())
    share = bl.RandomBatches(10, 6, seed=4, parallel=Two())()
    torch.testing.assert_close(share, bl.RandomBatches(10, 6, seed=4)()[3:], rtol=0, atol=0)  # the same draw, sliced
