"""From a DataFrame of raw recommender logs to a served model: the README's walk-through, runnable.

    python examples/table_to_serving.py [--rows 20000] [--epochs 3] [--out runs/table]

A synthetic click log: a user id, an item id, the user's recent items (a '|'-joined history, sometimes empty), a
price; labels click and buy (buy only known after a click: missing otherwise). The schema learns vocabularies
and scales from the training rows; MMoE trains on them; the model is saved with its schema, exported to ONNX and
packed into an InferenceSession, and all three are checked to answer alike on new rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import mmoe_fast as mf
from mmoe_fast.data import TableSchema
from mmoe_fast.train import fit, predict_proba

SPEC = {"features": [{"name": "user", "kind": "categorical", "dim": 8},
                     {"name": "item", "kind": "categorical", "dim": 8},
                     {"name": "history", "kind": "multi", "dim": 8, "table": "item", "sep": "|", "max_len": 20},
                     {"name": "price", "kind": "dense"}],
        "labels": ["click", "buy"]}


def click_log(rows: int, seed: int = 0) -> pd.DataFrame:
    """Some items and some users click more, an item already in the history more still, cheap items more; a buy
    (known only after a click) follows the item's quality and the price."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 500, rows), rng.integers(0, 300, rows)
    appeal, activity, quality = rng.normal(0, 1, 300), rng.normal(0, 0.7, 500), rng.normal(0, 1, 300)
    history = ["|".join(f"i{j}" for j in rng.integers(0, 300, rng.integers(0, 6))) for _ in range(rows)]
    seen = np.array([f"i{i}" in h.split("|") for i, h in zip(items, history)], dtype=float)
    price = np.exp(rng.normal(3.0, 0.8, rows))
    logit = -1.0 + appeal[items] + activity[users] + 1.5 * seen - 0.5 * (np.log(price) - 3.0)
    click = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(float)
    buy_logit = -0.5 + 1.2 * quality[items] - 0.8 * (np.log(price) - 3.0)
    buy = np.where(click == 1, (rng.random(rows) < 1 / (1 + np.exp(-buy_logit))).astype(float), np.nan)
    return pd.DataFrame({"user": [f"u{u}" for u in users], "item": [f"i{i}" for i in items], "history": history,
                         "price": price.round(2), "click": click, "buy": buy})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="runs/table")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    log = click_log(args.rows)
    train, val, new = log.iloc[: args.rows * 8 // 10], log.iloc[args.rows * 8 // 10 : args.rows * 9 // 10], \
        log.iloc[args.rows * 9 // 10 :].drop(columns=["click", "buy"])
    schema = TableSchema.from_spec(SPEC).fit(train)
    print(f"{len(train)} training rows; vocabularies: user {len(schema.vocabularies['user'])}, item "
          f"{len(schema.vocabularies['item'])} (history shares it); price mean {schema.stats['price'][0]:.1f}; "
          f"labels {schema.task_types}; buy known on {int(train.buy.notna().sum())} rows")

    model = mf.MMoE(schema.columns(), 2, task_types=schema.task_types, num_experts=4, expert_hidden=16)
    y, mask = schema.targets(train)
    y_val, mask_val = schema.targets(val)
    start = time.perf_counter()
    history = fit(model, schema.inputs(train), y, label_mask=mask, x_val=schema.inputs(val), y_val=y_val,
                  val_label_mask=mask_val, epochs=args.epochs, batch_size=256, lr=3e-3, progress=False,
                  log=lambda _: None)
    metrics = history[-1]["val_metrics"]  # each task on its labeled validation rows
    print(f"trained in {time.perf_counter() - start:.1f} s; validation AUC click {metrics[0]['auc']:.3f}, "
          f"buy (after a click) {metrics[1]['auc']:.3f}")

    mf.save(model, out / "model.pt", table=schema.to_dict())
    mf.export_onnx(model, out / "model.onnx")
    session = mf.InferenceSession(model)
    batch = schema.inputs(new)
    probs = predict_proba(model, batch)
    with torch.no_grad():
        eager = model(batch)
    import onnxruntime

    graph = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(graph.run(None, {k: v.numpy() for k, v in batch.items()})[0])
    reloaded = mf.load(out / "model.pt")
    with torch.no_grad():
        again = reloaded(TableSchema.from_spec(mf.checkpoint.read(out / "model.pt")["table"]).inputs(new))
    print(f"{len(new)} new rows: mean P(click) {probs[:, 0].mean():.3f}, mean P(buy | click) {probs[:, 1].mean():.3f}; "
          f"largest difference to the eager logits: session {(session.run(batch) - eager).abs().max():.1e}, "
          f"ONNX {(onnx_out - eager).abs().max():.1e}, reloaded {(again - eager).abs().max():.1e}")
    one = {k: v[:1] for k, v in batch.items()}
    for what, fn in (("model forward", lambda: model(one)), ("InferenceSession", lambda: session.run(one))):
        with torch.inference_mode():
            for _ in range(50):
                fn()
            t = time.perf_counter()
            for _ in range(500):
                fn()
        print(f"one request through {what}: {(time.perf_counter() - t) / 500 * 1e6:.0f} us")
    print(f"wrote {out / 'model.pt'} (with its schema) and {out / 'model.onnx'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
