"""The data-cleaning command with one injected fault: ``python _dc_faults.py COUNT [args...]`` SIGKILLs the
process in the middle of its COUNT-th write of state.pt (after half of the bytes; 0: no fault). Under torchrun,
``DC_KILL_RANK=r DC_KILL_AT=k`` in the environment SIGKILLs rank r when it begins its k-th evaluation (of any
method), after rank 0 has written the checkpoint of the evaluation before."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def install(count: int) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adversarial"))
    from _faults import write_half_and_die

    real_save = torch.save
    seen = {"n": 0}

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(obj, dict) and obj.get("run_kind") == "datacleaning":
            seen["n"] += 1
            if seen["n"] == count:
                write_half_and_die(real_save, obj, f, *args, **kwargs)
        real_save(obj, f, *args, **kwargs)

    torch.save = save


def install_rank_kill(rank: int, at: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    from applications.datacleaning.runner import MethodRun

    evaluate = MethodRun.evaluate
    seen = {"n": 0}

    def killing(self: MethodRun) -> Any:
        seen["n"] += 1
        if seen["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(self)

    MethodRun.evaluate = killing  # type: ignore[method-assign]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    install(int(sys.argv[1]))
    if "DC_KILL_RANK" in os.environ:
        install_rank_kill(int(os.environ["DC_KILL_RANK"]), int(os.environ["DC_KILL_AT"]))
    from applications.datacleaning.__main__ import main

    sys.exit(main(sys.argv[2:]))
