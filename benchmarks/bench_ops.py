"""Op benchmark: every available backend vs the loop and batched references (same as `mmoe-fast bench`).

Run: python benchmarks/bench_ops.py [--shape B,D,E,H,T ...] [--device cuda] [--dtype bfloat16]
(as a script it first raises its autogroup's priority, see mmoe_fast.timing.raise_priority)
"""

import sys

from mmoe_fast import timing
from mmoe_fast.bench import main

if __name__ == "__main__":
    timing.raise_priority()  # here, not in bench.main: tests call that in-process
    sys.exit(main())
