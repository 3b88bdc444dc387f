"""Interleaved timing: the candidates of one comparison take turns, so machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


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
