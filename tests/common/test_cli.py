"""One grammar (options and overrides in any order) and one way out (exit codes, one line, interrupts)."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import pytest

from applications.common.cli import ResumeHint, parse_args, run_command
from applications.common.errors import EXIT_DIVERGED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, Diverged, UserError
from applications.common.interrupts import Interrupted, deferred, interrupts_raise


@pytest.mark.parametrize("module", ["applications.adversarial.train", "applications.datacleaning.__main__"])
def test_overrides_on_both_sides_of_a_flag(module, monkeypatch):
    """``bilevel-train train.epochs=1 --no-progress seed=1`` used to end in "unrecognized arguments"."""
    import importlib

    mod = importlib.import_module(module)
    seen = {}
    monkeypatch.setattr(mod, "run_command", lambda body: seen.setdefault("body", body) and 0)
    monkeypatch.setattr(mod, "parse_args", lambda parser, argv: seen.setdefault("args", parse_args(parser, argv)))
    mod.main(["train.steps=5", "--no-progress", "seed=1", "--config", "x.yaml", "methods=[f2sa]"])
    args = seen["args"]
    assert args.overrides == ["train.steps=5", "seed=1", "methods=[f2sa]"]
    assert args.no_progress and str(args.config) == "x.yaml"


def _body(exc: BaseException):
    def body(hint: ResumeHint) -> int:
        raise exc

    return body


@pytest.mark.parametrize("exc, code", [(UserError("bad option"), EXIT_USAGE),
                                       (OSError(28, "No space left on device"), EXIT_USAGE),
                                       (Diverged("diverged at step 3"), EXIT_DIVERGED)])
def test_user_errors_are_one_line_and_an_exit_code(exc, code, capsys):
    assert run_command(_body(exc)) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command(lambda hint: 1 // 0)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, EXIT_SIGINT), (signal.SIGTERM, EXIT_SIGTERM)])
def test_signals_print_how_to_resume_and_exit_128_plus_n(sig, code, tmp_path, capsys):
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"x")

    def body(hint: ResumeHint) -> int:
        hint.command, hint.checkpoint = "bilevel-train --resume runs/x", checkpoint
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not interrupt")

    before = signal.getsignal(sig)
    assert run_command(body) == code
    assert signal.getsignal(sig) is before  # the handlers are given back
    err = capsys.readouterr().err.strip()
    assert err == (f"interrupted by {sig.name}: the last checkpoint ({checkpoint}) is kept; resume with: "
                   "bilevel-train --resume runs/x")


def test_the_hint_before_any_checkpoint(tmp_path):
    hint = ResumeHint()
    assert "nothing was saved" in hint.message()
    hint.command, hint.checkpoint = "cmd", Path(tmp_path / "none.pt")
    assert "before the first checkpoint" in hint.message()
    assert Interrupted(signal.SIGTERM).exit_code == 143


def test_the_parser_is_argparse_intermixed():
    p = argparse.ArgumentParser()
    p.add_argument("--flag", action="store_true")
    p.add_argument("rest", nargs="*")
    assert parse_args(p, ["a=1", "--flag", "b=2"]).rest == ["a=1", "b=2"]


def test_a_signal_inside_a_write_waits_for_its_end(tmp_path):
    """Measured before: SIGINT inside torch.save ended in the zip writer's RuntimeError and a traceback."""
    import torch

    from applications.common.checkpoint import load, save_atomic

    path = tmp_path / "state.pt"
    real_save = torch.save

    def save_then_signal(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the write
        real_save(obj, f, *args, **kwargs)

    with interrupts_raise(), pytest.raises(Interrupted):
        torch.save = save_then_signal
        try:
            save_atomic({"v": torch.arange(3)}, path)
        finally:
            torch.save = real_save
    assert torch.equal(load(path)["v"], torch.arange(3))  # the write was finished and renamed
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    with interrupts_raise():
        with pytest.raises(Interrupted) as info:
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done = True
        assert done and info.value.exit_code == 143


def test_a_reader_that_leaves_does_not_stop_the_command(tmp_path):
    """``command | head -1``: once the pipe closes, prints are dropped and the command goes on to its files and
    exit 0 (it died of BrokenPipeError, exit 2, before writing them). A child process, so that the pipe is real."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from pathlib import Path
        from applications.common.cli import run_command
        def body(hint):
            for i in range(20000):
                print("line", i)
            Path({str(tmp_path / "done")!r}).write_text("written")
            return 0
        raise SystemExit(run_command(body))
    """)
    proc = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$0" | head -1; exit ${{PIPESTATUS[0]}}', script],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and proc.stdout == "line 0\n", (proc.returncode, proc.stderr[-2000:])
    assert (tmp_path / "done").read_text() == "written" and "BrokenPipe" not in proc.stderr
