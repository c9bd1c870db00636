"""One timing harness for ``mmoe-fast bench`` and every script in ``benchmarks/``.

``median_time`` times one function (host clock; on a CUDA device a synchronize after each call so the
clock sees the GPU's work), ``interleaved`` runs several in turn, pass after pass, so that the noise of a
shared machine hits them alike, and ``kernel_time`` uses ``triton.testing.do_bench`` (CUDA events, L2
flushed between calls) on a GPU. All figures are seconds. Only torch and the standard library are
imported here (triton lazily), so a script run from the source tree on a bare GPU machine can use it.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)
AUTOGROUP = Path("/proc/self/autogroup")


def _sync_for(device: torch.device | str | None) -> Callable[[], None]:
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _check(*, min_time: float, min_reps: int, max_reps: int | None, warmup: int) -> None:
    if not min_time >= 0:  # also refuses NaN
        raise ValueError(f"min_time must be >= 0 seconds, got {min_time}")
    if min_reps < 1:
        raise ValueError(f"min_reps must be >= 1, got {min_reps}")
    if max_reps is not None and max_reps < min_reps:
        raise ValueError(f"max_reps must be >= min_reps ({min_reps}), got {max_reps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


def median_time(
    fn: Callable[[], object],
    *,
    device: torch.device | str | None = None,
    min_time: float = 0.2,
    min_reps: int = 5,
    max_reps: int | None = None,
    warmup: int = 3,
) -> float:
    """Median seconds of ``fn()``: ``warmup`` discarded calls, then timed calls until both ``min_reps``
    calls and ``min_time`` seconds are done, or ``max_reps`` calls (None: no cap).

    On a CUDA ``device`` it synchronizes before the first timed call and after each, so a call's time
    includes its kernels; on the CPU nothing waits.
    """
    _check(min_time=min_time, min_reps=min_reps, max_reps=max_reps, warmup=warmup)
    sync = _sync_for(device)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while (max_reps is None or len(times) < max_reps) and (
        len(times) < min_reps or time.perf_counter() - start < min_time
    ):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Timing:
    """One contender's figures from ``interleaved``: the median seconds of each pass, in order."""

    passes: tuple[float, ...]

    @property
    def best(self) -> float:
        """The best pass's median: a busy spell of a shared machine spoils a pass, never improves one."""
        return min(self.passes)

    @property
    def median(self) -> float:
        """The median of the passes' medians."""
        return statistics.median(self.passes)


def interleaved(
    fns: Mapping[K, Callable[[], object]],
    *,
    passes: int = 5,
    device: torch.device | str | None = None,
    min_time: float = 0.1,
    min_reps: int = 3,
    max_reps: int | None = None,
    warmup: int = 3,
) -> dict[K, Timing]:
    """Time every contender in turn, ``passes`` times over, each turn a ``median_time`` (the other
    arguments are its, per turn: ``warmup`` calls first in every turn, so that thread pools which spin
    after a call, OpenMP's and onnxruntime's, settle before the next contender is timed).
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if not fns:
        raise ValueError("interleaved needs at least one contender")
    medians: dict[K, list[float]] = {name: [] for name in fns}
    for _ in range(passes):
        for name, fn in fns.items():
            medians[name].append(median_time(fn, device=device, min_time=min_time, min_reps=min_reps,
                                             max_reps=max_reps, warmup=warmup))
    return {name: Timing(tuple(ts)) for name, ts in medians.items()}


def kernel_time(fn: Callable[[], object], *, device: torch.device | str, cpu_reps: int = 3) -> float:
    """Median seconds of ``fn()``: ``triton.testing.do_bench`` on a CUDA device (CUDA events, L2 flushed
    between calls, its own repetition count); elsewhere ``cpu_reps`` timed calls after one warm-up (the
    Triton interpreter is slow: a CPU run only checks that the script works).
    """
    if torch.device(device).type == "cuda":
        import triton.testing  # lazily: CPU users of this module need no triton

        return triton.testing.do_bench(fn, return_mode="median") * 1e-3
    return median_time(fn, device=device, min_time=0.0, min_reps=cpu_reps, max_reps=cpu_reps, warmup=1)


def raise_priority() -> bool:
    """Set this process's autogroup to nice -20; whether it worked. The scheduler shares the CPU between
    autogroups (sessions) first, so ``nice`` alone does not shield a benchmark from another session's
    jobs. Needs the right to raise priority (root or CAP_SYS_NICE); for benchmarks, never tests.

    The autogroup is the session's: the whole session keeps nice -20 after this process ends, so start a
    benchmark in a session of its own (``setsid -w python benchmarks/...``) unless that is what you want.
    """
    try:
        AUTOGROUP.write_text("-20")
    except OSError:
        return False
    return _autogroup_nice() == -20


def _autogroup_nice() -> int | None:
    try:
        return int(AUTOGROUP.read_text().split()[-1])  # "/autogroup-123 nice 0"
    except (OSError, ValueError, IndexError):
        return None


def load_average() -> float:
    """The 1-minute load average, NaN where the platform has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def conditions() -> str:
    """The machine's state for a benchmark's header: load average and, on Linux, the autogroup nice."""
    nice = _autogroup_nice()
    return f"load average {load_average():.1f}" + ("" if nice is None else f", autogroup nice {nice}")


def format_time(seconds: float | None, *, us_digits: int = 0) -> str:
    """``12 us`` below a millisecond, ``3.45 ms`` from there; ``-`` for no figure."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.{us_digits}f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def format_ratio(numerator: float | None, denominator: float | None) -> str:
    """``1.23x``; ``-`` when either figure is missing."""
    return "-" if numerator is None or denominator is None else f"{numerator / denominator:.2f}x"


def write_section(path: Path, name: str, text: str) -> None:
    """Replace benchmark ``name``'s section of the markdown file ``path`` (between ``<!-- name:begin -->`` and
    ``<!-- name:end -->``; appended when absent), so that every benchmark keeps its own."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"{begin}\n{text}{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: section, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    path.write_text(new)
