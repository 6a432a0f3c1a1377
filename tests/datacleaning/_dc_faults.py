"""The data-cleaning command with one injected fault: ``python _dc_faults.py COUNT [args...]`` SIGKILLs the
process in the middle of its COUNT-th write of state.pt (after half of the bytes; 0: no fault)."""

from __future__ import annotations

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


if __name__ == "__main__":
    install(int(sys.argv[1]))
    from applications.datacleaning.__main__ import main

    sys.exit(main(sys.argv[2:]))
