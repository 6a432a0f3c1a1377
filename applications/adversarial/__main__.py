"""``python -m applications.adversarial [train | evaluate] ARGS``: the two commands (``train`` when no
command is named), the same as ``bilevel-train`` and ``bilevel-evaluate``."""

from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatches to :func:`applications.adversarial.train.main` or :func:`~applications.adversarial.evaluate.main`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["evaluate"]:
        from .evaluate import main as evaluate

        return evaluate(args[1:])
    from .train import main as train

    return train(args[1:] if args[:1] == ["train"] else args)


if __name__ == "__main__":
    sys.exit(main())
