"""Op benchmark: every available backend vs the loop and batched references (same as `mmoe-fast bench`).

Run: python benchmarks/bench_ops.py [--shape B,D,E,H,T ...] [--device cuda] [--dtype bfloat16]
"""

import sys

from mmoe_fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
