"""Interleaved timing: the candidates of one comparison take turns, so machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from nemo_plrd.report import format_table


def interleaved_medians(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable over ``repeats`` rounds of (a, b, c, a, b, c, ...), after a warm-up."""
    for run in candidates.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def matmul_split(run: Callable[[], object]) -> tuple[float, float]:
    """(seconds in matrix products, seconds in all other ops) of one ``run()``, by torch's CPU profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    events = profile.key_averages()
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return matmul / 1e6, (sum(e.self_cpu_time_total for e in events) - matmul) / 1e6


def speedup_table(what: str, before: tuple[str, float], after: tuple[str, float], digits: int = 2) -> str:
    """One comparison's two timings, (label, seconds) each, as a table with the second's speed-up over the first."""
    (old, slow), (new, fast) = before, after
    return format_table((what, "seconds", "speed-up"), [(old, f"{slow:.{digits}f}", "1.0x"),
                                                         (new, f"{fast:.{digits}f}", f"{slow / fast:.1f}x")])
