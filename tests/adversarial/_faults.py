"""The train command with one injected fault: ``python _faults.py KIND:COUNT:WHEN [train args...]``.

The process SIGKILLs itself at the COUNT-th checkpoint of kind KIND (``last`` or ``best``):
``WHEN=mid`` after writing half of the file's bytes (a kill in the middle of the write), ``WHEN=after``
once the checkpoint is complete and renamed (a kill between two files of one epoch). An empty spec
runs the command unchanged. Under torchrun, ``BL_KILL_RANK=r BL_KILL_AT=k`` in the environment SIGKILLs rank r
as it enters its k-th action of rank 0 (``Trainer._on_main``: the run-directory check, its opening, then one
write per epoch), so rank 0 is left alone in a collective.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any, Dict


def write_half_and_die(real_save: Any, obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    """Writes the first half of ``real_save(obj)``'s bytes to ``f``, makes them durable, and SIGKILLs this process."""
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    import torch

    from applications.common import checkpoint

    kind, count, when = spec.split(":")
    seen = {"n": 0}

    def hit(obj: Any) -> bool:
        if isinstance(obj, dict) and obj.get("kind") == kind:
            seen["n"] += 1
            return seen["n"] == int(count)
        return False

    if when == "mid":
        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if hit(obj):
                write_half_and_die(real_save, obj, f, *args, **kwargs)
            real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif when == "after":
        real_atomic = checkpoint.save_atomic

        def save_atomic(obj: Dict[str, Any], path: Any) -> None:
            real_atomic(obj, path)
            if hit(obj):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save_atomic = save_atomic
    else:
        raise SystemExit(f"unknown fault {spec!r}")


def install_rank_kill(rank: int, at: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    from applications.adversarial.trainer import Trainer

    on_main = Trainer._on_main
    seen = {"n": 0}

    def killing(self: Trainer, action: Any) -> None:
        seen["n"] += 1
        if seen["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        on_main(self, action)

    Trainer._on_main = killing  # type: ignore[method-assign]


if __name__ == "__main__":
    if sys.argv[1]:
        install(sys.argv[1])
    if "BL_KILL_RANK" in os.environ:
        install_rank_kill(int(os.environ["BL_KILL_RANK"]), int(os.environ["BL_KILL_AT"]))
    from applications.adversarial.train import main

    sys.exit(main(sys.argv[2:]))
