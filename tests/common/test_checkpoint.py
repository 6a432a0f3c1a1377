"""Checkpoints: atomic writes survive crashes and SIGKILL, bad files fail loudly, RNG state round-trips."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from applications.common import checkpoint as ckpt
from applications.common.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_compatible,
    load,
    restore_rng_state,
    save_atomic,
)


def _payload(version: int) -> dict:
    g = torch.Generator().manual_seed(version)
    return {
        "version": version,
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.full((32,), float(version))},
        "optimizer": {"state": {0: {"momentum": torch.ones(3) * version}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
        "metrics": [0.5, 0.25, None],
        "name": "fast_bat",
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "last.pt"  # parent is created
    save_atomic(_payload(3), path)
    _assert_same(load(path), _payload(3))
    save_atomic(_payload(4), str(path))  # overwrite, str path
    _assert_same(load(str(path)), _payload(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp files left


def test_save_rejects_non_dict(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        save_atomic([1, 2], tmp_path / "x.pt")


def test_crash_during_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic(_payload(1), path)
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="simulated"):
        save_atomic(_payload(2), path)
    monkeypatch.setattr(torch, "save", real_save)
    _assert_same(load(path), _payload(1))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # temp file removed


def test_keyboard_interrupt_during_write_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(_payload(1), path)
    assert list(tmp_path.iterdir()) == []


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from applications.common.checkpoint import save_atomic
    path = sys.argv[1]
    i = 0
    while True:
        # ~2 MB per version, every entry equal to the version: a torn file cannot look consistent
        save_atomic({"version": i, "data": torch.full((512 * 1024,), float(i)), "tail": torch.tensor([i])}, path)
        print(i, flush=True)
        i += 1
    """
)


def test_sigkill_at_random_times_never_leaves_partial_file(tmp_path):
    """A writer loops over save_atomic; SIGKILL it at random instants; the file always loads whole."""
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs SIGKILL")
    rng = random.Random(1234)
    path = tmp_path / "ckpt.pt"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    seen = set()
    t0 = time.monotonic()
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # at least one version is complete before we start shooting
            assert first.strip().isdigit(), f"writer failed to start: {first!r}"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        last_printed = int([line for line in ([first] + proc.stdout.read().splitlines()) if line.strip()][-1])
        proc.stdout.close()
        obj = load(path)  # never CheckpointError
        v = obj["version"]
        assert torch.equal(obj["data"], torch.full((512 * 1024,), float(v)))
        assert obj["tail"].tolist() == [v]
        # the file is the last announced version or the one being written when the kill landed
        assert v in (last_printed, last_printed + 1), (trial, v, last_printed)
        seen.add(v)
        path.unlink()  # next trial starts from scratch; stray temp files may remain, that is allowed
    assert time.monotonic() - t0 < 60


def test_truncated_and_garbage_files_raise_checkpoint_error(tmp_path):
    path = tmp_path / "good.pt"
    save_atomic(_payload(1), path)
    data = path.read_bytes()
    for name, content in [("half.pt", data[: len(data) // 2]), ("garbage.pt", b"not a checkpoint at all"),
                          ("empty.pt", b"")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load(bad)
        assert str(bad) in str(info.value)
        assert "\n" not in str(info.value) and not str(info.value).endswith(": ")  # one line, with a reason
    with pytest.raises(CheckpointError, match="ends early"):
        load(tmp_path / "empty.pt")


def test_non_dict_payload_raises_checkpoint_error(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="list") as info:
        load(path)
    assert str(path) in str(info.value)


class _Arbitrary:
    pass


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "pickle.pt"
    torch.save({"obj": _Arbitrary()}, path)
    with pytest.raises(CheckpointError) as info:
        load(path)
    assert str(path) in str(info.value)
    # torch's advice to retry with weights_only=False (running the file's code) is not passed on as advice
    assert "will likely succeed" not in str(info.value) and "unless you trust it" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_raises_file_not_found(tmp_path):
    path = tmp_path / "nope" / "last.pt"
    with pytest.raises(FileNotFoundError, match="nope"):
        load(path)


def _draws() -> list:
    return [
        [random.random() for _ in range(5)] + [random.gauss(0.0, 1.0) for _ in range(3)],
        np.random.rand(5).tolist() + np.random.standard_normal(3).tolist(),  # noqa: NPY002 (global RNG under test)
        torch.rand(5).tolist() + torch.randn(3).tolist() + torch.randint(0, 1000, (4,)).tolist(),
    ]


def test_rng_round_trip_through_weights_only_checkpoint(tmp_path):
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002
    torch.manual_seed(0)
    # leave cached Gaussians in python and numpy generators: the state must carry them too
    random.gauss(0.0, 1.0)
    np.random.standard_normal()  # noqa: NPY002
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    save_atomic({"rng": state, "epoch": 3}, path)
    expected = _draws()
    _draws()  # advance further
    loaded = load(path)  # weights_only=True accepted the RNG state
    restore_rng_state(loaded["rng"])
    assert _draws() == expected
    # the in-memory state works as well, and a fresh draw differs (the test can fail)
    restore_rng_state(state)
    assert _draws() == expected
    assert _draws() != expected


def test_rng_state_is_weights_only_types():
    state = capture_rng_state()
    allowed = (torch.Tensor, int, float, str, type(None))

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            assert isinstance(x, allowed), type(x)

    walk(state)


def test_cuda_rng_states_are_captured_and_restored_per_device(tmp_path, monkeypatch):
    """No GPU here: fake torch.cuda's RNG functions and check the bookkeeping (which device gets what)."""
    states = {i: torch.full((16,), i + 1, dtype=torch.uint8) for i in range(3)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: states[int(device)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=0: restored.__setitem__(int(device), s.clone()))
    assert sorted(capture_rng_state()["cuda"]) == [0, 1, 2]
    state = capture_rng_state(cuda_devices=[1, 2])
    save_atomic({"rng": state}, tmp_path / "rng.pt")
    loaded = load(tmp_path / "rng.pt")["rng"]
    assert sorted(loaded["cuda"]) == [1, 2]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # resumed on fewer GPUs: device 2 is skipped
    restore_rng_state(loaded)
    assert sorted(restored) == [1] and torch.equal(restored[1], states[1])


def test_restore_rng_state_rejects_malformed():
    with pytest.raises(CheckpointError, match="numpy"):
        restore_rng_state({"python": capture_rng_state()["python"], "torch": torch.get_rng_state()})


_SAVED = {
    "model": {"name": "preact_resnet18", "num_classes": 10, "norm": {"mean": [0.49, 0.48, 0.45], "std": [0.2, 0.2, 0.2]}},
    "data": {"name": "cifar10", "batch_size": 128, "root": "/data"},
    "method": {"name": "fast_bat", "eps": 8 / 255, "lam": 10.0},
    "optim": {"lr": 0.2, "epochs": 20},
    "output": {"dir": "runs/a"},
}


def _copy(d):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def test_check_compatible_accepts_identical_and_allowed_differences():
    check_compatible(_SAVED, _copy(_SAVED))
    new = _copy(_SAVED)
    new["optim"] = {"lr": 0.1, "epochs": 30}
    new["output"] = {"dir": "runs/b"}
    new["data"]["batch_size"] = 256
    new["data"]["root"] = "/elsewhere"
    new["method"]["lam"] = 0.0          # not model-defining
    new["method"]["eps"] = 8.0 / 255.0  # same number, computed again
    new["model"]["norm"]["mean"] = (0.49, 0.48, 0.45)  # tuple vs list
    check_compatible(_SAVED, new)


def test_check_compatible_lists_every_differing_key():
    new = _copy(_SAVED)
    new["model"]["name"] = "wide_resnet34_10"
    new["model"]["norm"]["std"] = [0.25, 0.2, 0.2]   # nested under model
    new["model"]["width"] = 10                        # only in the new config
    new["data"]["name"] = "cifar100"
    new["method"]["name"] = "fast_at"
    new["method"]["eps"] = 16 / 255
    new["optim"]["lr"] = 0.01                         # allowed, must not be listed
    with pytest.raises(CheckpointError) as info:
        check_compatible(_SAVED, new)
    msg = str(info.value)
    for key, old, now in [("model.name", "'preact_resnet18'", "'wide_resnet34_10'"),
                          ("model.norm.std", "[0.2, 0.2, 0.2]", "[0.25, 0.2, 0.2]"),
                          ("model.width", "<missing>", "10"),
                          ("data.name", "'cifar10'", "'cifar100'"),
                          ("method.name", "'fast_bat'", "'fast_at'"),
                          ("method.eps", repr(8 / 255), repr(16 / 255))]:
        assert f"{key}: saved={old} new={now}" in msg, (key, msg)
    for allowed in ("optim", "lr", "output", "batch_size"):
        assert allowed not in msg


def test_check_compatible_extra_keys():
    new = _copy(_SAVED)
    new["method"]["lam"] = 0.0
    check_compatible(_SAVED, new)
    with pytest.raises(CheckpointError, match="method.lam"):
        check_compatible(_SAVED, new, extra_keys=["method.lam"])


def test_module_exports():
    assert set(ckpt.__all__) >= {"CheckpointError", "save_atomic", "load", "capture_rng_state", "restore_rng_state",
                                 "check_compatible"}
