"""Forked children and GNU OpenMP: a clear error or a working child, never a killed or hung process.

The C++ kernels (and torch) run on GNU OpenMP too, whose threads do not survive fork(): a forked child
that starts a parallel region after its parent used one hangs. So a child of a process that ran the C++
kernels (:func:`mark_openmp_used`) is set to one thread (``torch.set_num_threads(1)``, which the
kernels follow), as PyTorch's own DataLoader workers are.

Once numba's ``omp`` threading layer has started its pool, a forked child (a ``fork`` DataLoader worker, a
``multiprocessing`` fork pool) that runs a parallel numba kernel is terminated by GNU OpenMP, with no
Python error. :func:`check_numba` raises instead, telling the user to start children with ``spawn`` (or
``forkserver``), or to pick another backend in them. The parent records at each fork whether the pool is
running; the child only reads that record.
"""

from __future__ import annotations

import os
import sys

SPAWN_HINT = ("start worker processes with the 'spawn' start method (multiprocessing_context='spawn' for a "
              "DataLoader, multiprocessing.set_start_method('spawn')), or use backend='cpp' or 'reference' in them")

_inherited_openmp = False  # this process was forked from one running numba's GNU OpenMP pool
_openmp_used = False  # this process ran the C++ kernels' OpenMP regions


def mark_openmp_used() -> None:
    """Called by the C++ backend before its kernels run: children forked from now on run on one thread."""
    global _openmp_used
    _openmp_used = True


def _numba_openmp_running() -> bool:
    """Whether numba's pool is started on the GNU OpenMP layer (read without starting it)."""
    if "numba" not in sys.modules:
        return False
    from numba.np.ufunc import parallel

    if not parallel._is_initialized:
        return False
    try:
        return parallel.threading_layer() == "omp"
    except ValueError:
        return False


def _after_fork_in_child(running: list[bool]) -> None:
    global _inherited_openmp
    _inherited_openmp = _inherited_openmp or running[0]
    if _openmp_used:
        import torch

        torch.set_num_threads(1)


def check_numba() -> None:
    """RuntimeError with what to do when this process is a fork of one running numba's OpenMP pool."""
    if _inherited_openmp:
        raise RuntimeError("the numba backend cannot run in this forked process: its parent had started numba's "
                           f"GNU OpenMP threads, which do not survive fork(); {SPAWN_HINT}")


_running = [False]
os.register_at_fork(before=lambda: _running.__setitem__(0, _numba_openmp_running()),
                    after_in_child=lambda: _after_fork_in_child(_running))
