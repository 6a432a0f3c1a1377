"""Shared helpers of the benchmark scripts: machine description, timing, tables and JSON output.

Timing protocol (every script): the measured callable runs ``warmup`` times, then ``repeats`` times in
the same process; the reported number is the median of the repeats (with the first and third quartiles
next to it). On CUDA the device is synchronized before and after each repeat, so the time is the
wall-clock time of the whole step including its kernels. The median process CPU time (all threads) is
recorded next to it: on a shared, loaded CPU machine it is far less sensitive to preemption than the
wall clock, so ratios between methods are best read from it there.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "machine_info", "time_callable", "time_interleaved", "markdown_table", "write_json", "fmt",
           "load_average"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> Dict[str, Any]:
    """Describe the machine: CPU model (from /proc/cpuinfo), cores, torch threads and version, GPU if used."""
    info: Dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda_version"] = torch.version.cuda
    return info


def _sync(device: Optional[str]) -> None:
    if device is not None and device.startswith("cuda"):
        torch.cuda.synchronize()


def time_callable(fn: Callable[[], Any], repeats: int = 15, warmup: int = 3,
                  device: Optional[str] = None) -> Dict[str, float]:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    Returns ``{"median_s", "q1_s", "q3_s", "repeats", "cpu_median_s"}``.
    """
    if repeats < 1:
        raise ValueError(f"time_callable: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    cpu: List[float] = []
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return _summary(times, cpu)


def time_interleaved(fns: Sequence[Callable[[], Any]], repeats: int = 15, warmup: int = 3,
                     device: Optional[str] = None) -> List[Dict[str, float]]:
    """Like :func:`time_callable` for several callables, run round-robin (one call of each per round).

    On a shared machine the background load drifts; interleaving exposes every method to the same
    drift, so the ratios between them stay meaningful even when absolute times move.
    """
    if repeats < 1:
        raise ValueError(f"time_interleaved: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: List[List[float]] = [[] for _ in fns]
    cpu: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return [_summary(t, c) for t, c in zip(times, cpu)]


def _summary(times: List[float], cpu: List[float]) -> Dict[str, float]:
    times = sorted(times)
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4)
    else:
        q1, q3 = times[0], times[-1]
    return {"median_s": statistics.median(times), "q1_s": q1, "q3_s": q3, "repeats": len(times),
            "cpu_median_s": statistics.median(cpu), "min_s": times[0], "cpu_min_s": min(cpu)}


def load_average() -> Optional[List[float]]:
    """The 1/5/15-minute load averages (None where unavailable): how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def fmt(value: Any, digits: int = 3) -> str:
    """Format a table cell: floats with ``digits`` significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table from a header row and value rows (cells formatted with :func:`fmt`)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path: Path, data: Dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)
    return path
