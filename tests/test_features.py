"""Feature columns (mmoe_fast.features) against plain per-column PyTorch: embedding outputs and gradients equal
``nn.EmbeddingBag`` lookups table by table (one stacked lookup per width must change nothing), shared tables,
padded and (ids, offsets) multi-valued input, dense normalization, bad input, and every model built on columns
training, saving and loading; serving refuses them by name."""

import pytest
import torch
import torch.nn.functional as F

import mmoe_fast as mf
from mmoe_fast import models
from mmoe_fast.features import Categorical, Dense, FeatureEncoder, Multi, from_dict, to_dict
from mmoe_fast.train import fit, predict

COLUMNS = [Categorical("user", 11, 8), Multi("history", 7, 4, "mean"), Dense("age", 1, 40.0, 10.0),
           Categorical("item", 7, 4, table="history"), Multi("tags", 5, 8, "sum"),
           Dense("xy", 2, (1.0, -1.0), (2.0, 4.0))]


def _batch(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 7, (n, 4), generator=g)
    history[torch.rand(n, 4, generator=g) < 0.4] = -1
    history[0] = -1  # a row without any id: its mean is 0
    return {"user": torch.randint(0, 11, (n,), generator=g), "history": history,
            "age": torch.rand(n, generator=g) * 80, "item": torch.randint(0, 7, (n,), generator=g),
            "tags": torch.randint(0, 5, (n, 3), generator=g), "xy": torch.randn(n, 2, generator=g)}


def _reference(enc, batch):
    """Column by column with F.embedding_bag on each table's own rows."""
    parts = []
    for c in enc.columns:
        if isinstance(c, Dense):
            v = batch[c.name].reshape(len(batch[c.name]), -1)
            parts.append((v - torch.tensor(c.mean).reshape(-1)) / torch.tensor(c.std).reshape(-1))
            continue
        weight = enc.table_weight(c.table or c.name)
        ids = batch[c.name]
        if isinstance(c, Categorical):
            parts.append(F.embedding(ids, weight))
            continue
        rows = []
        for row in ids:
            kept = row[row >= 0]
            pooled = F.embedding(kept, weight).sum(0) if len(kept) else weight.new_zeros(c.dim)
            rows.append(pooled / max(len(kept), 1) if c.pooling == "mean" else pooled)
        parts.append(torch.stack(rows))
    return torch.cat(parts, dim=1)


def test_encoder_equals_per_column_lookups_forward_and_backward():
    torch.manual_seed(0)
    enc = FeatureEncoder(COLUMNS)
    assert enc.out_features == 8 + 4 + 1 + 4 + 8 + 2 and set(enc.bags) == {"8_0", "4_0"}  # one lookup per width
    batch = _batch()
    out = enc(batch)
    want = _reference(enc, batch)
    torch.testing.assert_close(out, want)
    assert out[0, 8:12].abs().sum() == 0  # no history ids: 0
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [b.weight for b in enc.bags.values()], dout)
    ref_grads = torch.autograd.grad(want, [b.weight for b in enc.bags.values()], dout)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    # "item" reads the "history" table: both columns' gradients land in its rows, no other table's.
    assert enc.table_weight("history").shape == (7, 4) and "item" not in enc.offsets


def test_offsets_input_equals_padded_input():
    torch.manual_seed(1)
    enc = FeatureEncoder([Multi("h", 9, 3, "mean")])
    padded = torch.tensor([[1, 2, -1], [-1, -1, -1], [4, 4, 8]])
    flat, offsets = torch.tensor([1, 2, 4, 4, 8]), torch.tensor([0, 2, 2])
    torch.testing.assert_close(enc({"h": (flat, offsets)}), enc({"h": padded}))


@pytest.mark.parametrize("columns,batch,match", [
    ([Categorical("a", 5, 2)], {"a": torch.tensor([0, 5])}, r"a: id 5 is outside \[0, 5\)"),
    ([Categorical("a", 5, 2)], {"a": torch.tensor([-1, 2])}, r"a: id -1 is outside"),
    ([Multi("m", 5, 2)], {"m": torch.tensor([[0, 7]])}, r"m: id 7 is outside \[0, 5\) \(-1 pads"),
    ([Categorical("a", 5, 2)], {"b": torch.tensor([0])}, "the batch has no column 'a'"),
    ([Categorical("a", 5, 2)], {"a": torch.tensor([0.0, 1.0])}, "ids must be integers"),
    ([Categorical("a", 5, 2)], {"a": torch.tensor([[0, 1]])}, "a categorical column takes ids"),
    ([Categorical("a", 5, 2), Dense("d", 2)], {"a": torch.tensor([0, 1]), "d": torch.zeros(2, 3)}, "a dense column"),
    ([Multi("m", 5, 2)], {"m": (torch.tensor([0, 1]), torch.tensor([1, 0]))}, "offsets must start at 0"),
])
def test_bad_column_input_is_refused(columns, batch, match):
    with pytest.raises(ValueError, match=match):
        FeatureEncoder(columns)(batch)


@pytest.mark.parametrize("columns,match", [
    ([Categorical("a", 5, 2), Categorical("a", 5, 2)], "distinct names"),
    ([Categorical("a", 5, 2), Categorical("b", 6, 2, table="a")], "shared by columns of other sizes"),
    ([Multi("m", 5, 2, "max")], "pooling must be"),
    ([Categorical("a", 0, 2)], "vocab must be a positive int"),
    ([Dense("d", 2, (1.0,))], "mean needs 2 values"),
    ([Dense("d", 1, 0.0, 0.0)], "std must be > 0"),
    ([{"kind": "sparse", "name": "a"}], "needs a kind"),
])
def test_bad_columns_are_refused(columns, match):
    with pytest.raises(ValueError, match=match):
        FeatureEncoder(columns)


def test_columns_round_trip_as_plain_data():
    for c in COLUMNS:
        assert from_dict(to_dict(c)) == c


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_trains_saves_and_loads_on_columns(name, tmp_path):
    torch.manual_seed(0)
    model = models.build_model(name, COLUMNS, 2, task_types=("binary", "binary"))
    batch = _batch(40)
    y = torch.stack([(batch["user"] % 2).float(), (batch["item"] > 3).float() * (batch["user"] % 2)], 1)
    fit(model, batch, y, x_val=batch, y_val=y, epochs=2, batch_size=16, progress=False, log=lambda _: None)
    mf.save(model, tmp_path / "m.pt")
    loaded = mf.load(tmp_path / "m.pt")
    model.eval()
    assert torch.equal(loaded(batch), model(batch))
    # predict runs 7-row chunks under no_grad: the model's own outputs on those chunks, bit for bit (a plain torch
    # GEMM, as ESMM's, may round differently at another batch size: the whole batch is the reference to rounding)
    with torch.no_grad():
        chunks = [model({k: v[i:i + 7] for k, v in batch.items()}) for i in range(0, 40, 7)]
    assert torch.equal(predict(model, batch, batch_size=7), torch.cat(chunks))
    torch.testing.assert_close(predict(model, batch, batch_size=7), model(batch))
    # The encoder feeds the model exactly what a dense model of the same weights gets from encoded x.
    dense = models.build_model(name, model.encoder.out_features, 2, task_types=("binary", "binary"))
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")})
    torch.testing.assert_close(dense.eval()(model.encoder(batch)), model(batch))


def test_large_tables_of_one_width_split_into_stacks(monkeypatch):
    from mmoe_fast import features

    monkeypatch.setattr(features, "STACK_BYTES", 7 * 4 * 4)  # 7 rows of width 4 a stack
    torch.manual_seed(2)
    enc = FeatureEncoder([Categorical("a", 4, 4), Categorical("b", 3, 4), Categorical("c", 2, 4), Multi("m", 9, 4)])
    assert {k: b.num_embeddings for k, b in enc.bags.items()} == {"4_0": 7, "4_1": 2, "4_2": 9}
    batch = {"a": torch.tensor([3, 0]), "b": torch.tensor([2, 1]), "c": torch.tensor([1, 1]),
             "m": torch.tensor([[8, 0, -1], [-1, -1, -1]])}
    torch.testing.assert_close(enc(batch), _reference(enc, batch))


def test_feature_benchmark_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_features.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "encoder / by hand" in proc.stdout
