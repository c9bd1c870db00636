"""The feature-column encoder against plain per-column ``nn.EmbeddingBag`` lookups, forward + backward.

A recommender-shaped batch: 8 categorical columns (vocab 10^5, width 16; two share a table), 2 multi-valued
columns (history of up to 20 ids, mean pooled; tags of 5, summed; width 16) and 4 dense columns. The encoder
looks all same-width tables up in one ``nn.EmbeddingBag`` call; the alternative is what a user writes by hand:
one ``nn.EmbeddingBag`` per table, called per column, then ``torch.cat``. Medians, interleaved, one process.

    python benchmarks/bench_features.py [--batch 4096] [--passes 5] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import _import_package  # noqa: E402

_import_package()
from mmoe_fast import timing  # noqa: E402
from mmoe_fast.features import Categorical, Dense, FeatureEncoder, Multi  # noqa: E402

VOCAB, DIM = 100_000, 16


def columns():
    cats = [Categorical(f"c{i}", VOCAB, DIM) for i in range(7)] + [Categorical("c7", VOCAB, DIM, table="c0")]
    return [*cats, Multi("history", VOCAB, DIM, "mean"), Multi("tags", 1000, DIM, "sum"),
            *(Dense(f"d{i}") for i in range(4))]


def batch(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {f"c{i}": torch.randint(0, VOCAB, (n,), generator=g) for i in range(8)}
    history = torch.randint(0, VOCAB, (n, 20), generator=g)
    history[torch.rand(n, 20, generator=g) < 0.5] = -1
    out.update(history=history, tags=torch.randint(0, 1000, (n, 5), generator=g))
    out.update({f"d{i}": torch.randn(n, generator=g) for i in range(4)})
    return out


class ByHand(nn.Module):
    """One nn.EmbeddingBag per table, one call per column (padded multi-valued ids with a per-row mask)."""

    def __init__(self, encoder: FeatureEncoder):
        super().__init__()
        self.cols = encoder.columns
        self.tables = nn.ModuleDict()
        for c in self.cols:
            if not isinstance(c, Dense) and (c.table or c.name) not in self.tables:
                bag = nn.EmbeddingBag(c.vocab, c.dim, mode="sum")
                bag.weight.data.copy_(encoder.table_weight(c.table or c.name))
                self.tables[c.table or c.name] = bag

    def forward(self, b):
        parts = []
        for c in self.cols:
            if isinstance(c, Dense):
                parts.append(b[c.name][:, None])
                continue
            bag, ids = self.tables[c.table or c.name], b[c.name]
            if isinstance(c, Categorical):
                parts.append(bag(ids[:, None]))
                continue
            present = ids >= 0
            counts = present.sum(1)
            weights = (1.0 / counts.clamp_min(1)).repeat_interleave(counts) if c.pooling == "mean" else None
            parts.append(bag(ids[present], torch.cumsum(counts, 0) - counts, per_sample_weights=weights))
        return torch.cat(parts, dim=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script (the test suite's)")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    if args.smoke:
        args.batch, args.passes = 64, 1
    else:
        timing.raise_priority()  # not in --smoke: the whole session would keep the priority
    torch.manual_seed(0)
    enc = FeatureEncoder(columns())
    hand = ByHand(enc)
    b = batch(args.batch)
    assert torch.allclose(enc(b), hand(b), atol=1e-6), "the two forms disagree"
    grad = torch.randn(args.batch, enc.out_features)

    def step(module):
        module.zero_grad(set_to_none=True)
        module(b).backward(grad)

    times = {"encoder": [], "by hand": []}
    start = time.perf_counter()
    for _ in range(args.passes):  # interleaved passes; each a median
        for name, module in (("encoder", enc), ("by hand", hand)):
            times[name].append(timing.median_time(lambda m=module: step(m), device="cpu", min_time=0.2))
    best = {k: min(v) for k, v in times.items()}
    print(f"B={args.batch}, {len(enc.columns)} columns, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - start:.0f} s: forward+backward encoder {best['encoder'] * 1e3:.2f} ms, "
          f"by hand {best['by hand'] * 1e3:.2f} ms: encoder / by hand = {best['encoder'] / best['by hand']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
