"""A user's own table: the schema's encoding against hand-built ids, bad input by name, and the train/predict/gates
commands on a CSV and a Parquet file."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import checkpoint, cli
from mmoe_fast.data import TableSchema, read_table
from mmoe_fast.train import fit, predict_proba

SPEC = {"features": [{"name": "user", "kind": "categorical", "dim": 4},
                     {"name": "item", "kind": "categorical", "dim": 3},
                     {"name": "history", "kind": "multi", "dim": 3, "table": "item", "pooling": "sum"},
                     {"name": "age", "kind": "dense"}],
        "labels": ["click", {"name": "watch", "type": "regression"}]}


def frame(n=200, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, n)
    items = rng.choice(["shoe", "hat", "sock", "bag"], n)
    history = ["|".join(rng.choice(["shoe", "hat", "sock", "bag", "belt"], rng.integers(0, 4))) for _ in range(n)]
    age = rng.normal(40, 10, n)
    click = ((users % 3 == 0) | (items == "hat")).astype(float)
    return pd.DataFrame({"user": users, "item": items, "history": history, "age": age, "click": click,
                         "watch": age / 10 + rng.normal(0, 1, n)})


def test_fit_learns_vocabularies_stats_and_label_types():
    df = frame()
    schema = TableSchema.from_spec(SPEC).fit(df)
    assert schema.task_types == ("binary", "regression")
    assert schema.vocabularies["user"] == sorted({str(u) for u in df.user})
    # history shares item's table: its values join the vocabulary (belt is seen only in histories)
    assert schema.vocabularies["item"] == ["bag", "belt", "hat", "shoe", "sock"]
    mean, std = schema.stats["age"]
    assert mean == pytest.approx(df.age.mean()) and std == pytest.approx(df.age.std(ddof=0))
    cols = schema.columns()
    assert [type(c).__name__ for c in cols] == ["Categorical", "Categorical", "Multi", "Dense"]
    assert cols[0].vocab == len(schema.vocabularies["user"]) + 1 and cols[2].table == "item"
    # given stats and types are kept
    spec = json.loads(json.dumps(SPEC))
    spec["features"][3].update(mean=1.0, std=2.0)
    spec["labels"][0] = {"name": "click", "type": "regression"}
    given = TableSchema.from_spec(spec).fit(df)
    assert given.stats["age"] == (1.0, 2.0) and given.task_types == ("regression", "regression")


def test_inputs_are_the_vocabulary_ids_unseen_and_missing_are_zero():
    train = pd.DataFrame({"user": [7, 3, 7], "item": ["hat", "shoe", "hat"], "history": ["hat|shoe", "", "sock"],
                          "age": [1.0, 2.0, 3.0], "click": [1.0, 0.0, 1.0], "watch": [0.5, 1.5, 2.5]})
    schema = TableSchema.from_spec(SPEC).fit(train)
    new = pd.DataFrame({"user": [3.0, np.nan, 99.0], "item": ["shoe", "cap", None],
                        "history": ["sock|hat|sock", None, "cap|shoe"], "age": [2.0, 2.0, 2.0]})
    x = schema.inputs(new)
    # a float column (read so because of the NaN) matches the integer values of training: 3.0 is "3"
    assert x["user"].tolist() == [1, 0, 0]  # vocab ["3", "7"]: 3 -> 1; missing and unseen -> 0
    assert x["item"].tolist() == [2, 0, 0]  # vocab ["hat", "shoe", "sock"]
    assert x["history"].tolist() == [[3, 1, 3], [-1, -1, -1], [0, 2, -1]]
    assert x["age"].dtype == torch.float32 and x["age"].tolist() == [2.0, 2.0, 2.0]
    spec = json.loads(json.dumps(SPEC))
    spec["features"][2]["max_len"] = 2
    assert TableSchema.from_spec(spec).fit(train).inputs(new)["history"].tolist() == [[3, 1], [-1, -1], [0, 2]]


def test_the_model_sees_the_pooled_embeddings_of_the_ids():
    df = frame(50)
    schema = TableSchema.from_spec(SPEC).fit(df)
    model = mf.MMoE(schema.columns(), 2, task_types=schema.task_types)
    x = schema.inputs(df)
    enc = model.encoder(x)
    item = model.encoder.table_weight("item")
    ids = x["history"]
    want = torch.stack([item[row[row >= 0]].sum(0) for row in ids])  # sum pooling, by hand
    torch.testing.assert_close(enc[:, 7:10], want)
    torch.testing.assert_close(enc[:, 4:7], item[x["item"]])
    torch.testing.assert_close(enc[:, 10], (torch.tensor(df.age.values, dtype=torch.float32)
                                            - schema.stats["age"][0]) / schema.stats["age"][1])


def test_targets_mask_missing_labels():
    df = frame(20)
    df.loc[[2, 5], "click"] = np.nan
    df.loc[7, "watch"] = np.nan
    schema = TableSchema.from_spec(SPEC).fit(df)
    y, mask = schema.targets(df)
    assert y.shape == (20, 2) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (~mask).nonzero().tolist() == [[2, 0], [5, 0], [7, 1]]
    assert schema.targets(df.dropna())[1] is None
    model = mf.MMoE(schema.columns(), 2, task_types=schema.task_types)
    history = fit(model, schema.inputs(df), y, label_mask=mask, epochs=1, batch_size=8, progress=False)
    assert np.isfinite(history[-1]["train_loss"]).all()


def test_round_trip_through_json_encodes_the_same():
    df = frame()
    schema = TableSchema.from_spec(SPEC).fit(df)
    again = TableSchema.from_spec(json.loads(json.dumps(schema.to_dict())))
    assert again.fitted and again.task_types == schema.task_types
    a, b = schema.inputs(df), again.inputs(df)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["features"][0].update(kind="sparse"), "kind must be one of"),
    (lambda s: s["features"][0].pop("dim"), "needs dim"),
    (lambda s: s["features"][0].update(dims=4), "unknown key(s) ['dims']"),
    (lambda s: s["features"][2].update(pooling="max"), "pooling must be"),
    (lambda s: s["features"][2].update(dim=5), "shared by columns of other widths"),
    (lambda s: s["features"][2].update(max_len=0), "max_len must be a positive int"),
    (lambda s: s["features"][3].update(std=0), "std must be > 0"),
    (lambda s: s["labels"].append("user"), "named more than once"),
    (lambda s: s["labels"].__setitem__(0, {"name": "click", "type": "ranking"}), "type must be one of"),
    (lambda s: s.update(labels=[]), "non-empty list of label columns"),
    (lambda s: s.update(extra=1), "unknown key(s) ['extra']"),
])
def test_bad_specs_are_refused_by_name(change, message):
    spec = json.loads(json.dumps(SPEC))
    change(spec)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TableSchema.from_spec(spec)


def test_bad_tables_are_refused_by_name():
    schema = TableSchema.from_spec(SPEC)
    df = frame(20)
    with pytest.raises(ValueError, match="no column 'age'"):
        schema.fit(df.drop(columns="age"))
    with pytest.raises(ValueError, match="needs a fitted schema"):
        schema.inputs(df)
    bad = df.copy()
    bad.loc[4, "age"] = np.nan
    with pytest.raises(ValueError, match="dense column 'age' has no finite value at row 4"):
        schema.fit(bad)
    bad = df.astype({"age": object})
    bad.loc[1, "age"] = "old"
    with pytest.raises(ValueError, match="dense column 'age' holds 'old'"):
        schema.fit(bad)
    fitted = schema.fit(df)
    bad = df.copy()
    bad.loc[0, "click"] = 2.0
    with pytest.raises(ValueError, match="label 'click' is binary but holds 2.0"):
        fitted.targets(bad)
    with pytest.raises(ValueError, match="label 'watch' has no known value"):
        schema.fit(df.assign(watch=np.nan))
    with pytest.raises(TypeError, match="pandas DataFrame"):
        fitted.inputs(df.to_numpy())
    # predictions need only the features
    assert set(fitted.inputs(df.drop(columns=["click", "watch"]))) == {"user", "item", "history", "age"}


def test_read_table_csv_tsv_parquet_and_bad_files(tmp_path):
    df = frame(30)
    df.to_csv(tmp_path / "a.csv", index=False)
    df.to_csv(tmp_path / "a.tsv", index=False, sep="\t")
    df.to_parquet(tmp_path / "a.parquet")
    schema = TableSchema.from_spec(SPEC).fit(df)
    want = schema.inputs(df)
    for name in ("a.csv", "a.tsv", "a.parquet"):
        got = schema.inputs(read_table(tmp_path / name))
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # an empty history cell stays empty (not the text "nan"), in CSV too
    assert read_table(tmp_path / "a.csv").history.isna().sum() == (df.history == "").sum()
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_table(tmp_path / "b.csv")
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(ValueError, match="a .csv, .tsv"):
        read_table(tmp_path / "a.xlsx")


@pytest.fixture
def table_files(tmp_path):
    df = frame(400)
    df.loc[[5, 9], "click"] = np.nan
    df.to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    return tmp_path


def test_train_and_predict_commands_on_a_csv(table_files, capsys):
    d = table_files
    rc = cli.main(["train", "--data", str(d / "train.csv"), "--features", str(d / "spec.json"), "--epochs", "2",
                   "--batch-size", "64", "--no-progress", "--checkpoint-dir", str(d / "ck"), "--val-fraction",
                   "0.25"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "300 train / 100 validation rows, 4 feature columns, labels click (binary), watch (regression)" in out
    assert "task0 auc=" in out and "epoch   2" in out
    new = frame(25, seed=3).drop(columns=["click", "watch"])
    new.to_parquet(d / "new.parquet")
    rc = cli.main(["predict", str(d / "ck" / "model.pt"), "--data", str(d / "new.parquet"), "--out",
                   str(d / "out" / "p.csv"), "--keep", "user,item"])
    assert rc == 0 and "25 rows predicted" in capsys.readouterr().out
    got = pd.read_csv(d / "out" / "p.csv")
    assert list(got.columns) == ["user", "item", "click", "watch"] and got.user.tolist() == new.user.tolist()
    ckpt = checkpoint.read(d / "ck" / "model.pt")
    model, schema = checkpoint.model_from(ckpt, "m"), TableSchema.from_spec(ckpt["table"])
    want = predict_proba(model, schema.inputs(new)).double().numpy()
    np.testing.assert_allclose(got[["click", "watch"]].to_numpy(), want, rtol=1e-6)
    assert ((got.click > 0) & (got.click < 1)).all()
    assert cli.main(["gates", str(d / "ck" / "model.pt"), "--out", str(d / "g")]) == 0
    assert "(100 rows)" in capsys.readouterr().out


def test_commands_refuse_mixed_or_missing_options_and_changed_files(table_files, capsys):
    d = table_files
    data = ["--data", str(d / "train.csv")]
    for argv, message in [
        (["train", *data], "needs --features SPEC.json"),
        (["train", *data, "--features", str(d / "spec.json"), "--n-train", "10"], "--n-train are for the synthetic"),
        (["train", "--features", str(d / "spec.json")], "--features are for a table"),
        (["train", *data, "--features", str(d / "spec.json"), "--val-data", str(d / "train.csv"),
          "--val-fraction", "0.2"], "not both"),
        (["predict", str(d / "nothing.pt"), *data, "--out", str(d / "p.csv")], "no such checkpoint"),
    ]:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    common = ["train", *data, "--features", str(d / "spec.json"), "--batch-size", "100", "--no-progress",
              "--checkpoint-dir", str(d / "ck"), "--checkpoint-every", "2"]
    assert cli.main([*common, "--steps", "2"]) == 0
    with open(d / "train.csv", "a") as f:
        f.write("1,hat,,30.0,1,3.0\n")
    assert cli.main([*common, "--steps", "4", "--resume", str(d / "ck")]) == 2
    assert "--data (the file's contents)" in capsys.readouterr().err
    assert cli.main(["gates", str(d / "ck" / "model.pt"), "--out", str(d / "g")]) == 2
    assert "has changed since" in capsys.readouterr().err
    synthetic = checkpoint.read(d / "ck" / "model.pt")
    synthetic.pop("table")
    torch.save(synthetic, d / "plain.pt")
    assert cli.main(["predict", str(d / "plain.pt"), *data, "--out", str(d / "p.csv")]) == 2
    assert "holds no table schema" in capsys.readouterr().err


def test_the_walk_through_example_runs_and_its_three_servings_agree(tmp_path):
    import importlib.util
    import io
    from contextlib import redirect_stdout
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "table_to_serving.py"
    spec = importlib.util.spec_from_file_location("table_to_serving", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert example.main(["--rows", "3000", "--epochs", "1", "--out", str(tmp_path)]) == 0
    text = printed.getvalue()
    assert "validation AUC click" in text and (tmp_path / "model.pt").exists() and (tmp_path / "model.onnx").exists()
    line = next(t for t in text.splitlines() if "largest difference" in t)
    for what in ("session", "ONNX", "reloaded"):
        assert float(line.split(f"{what} ")[1].split(",")[0]) < 1e-5, line


def test_text_ids_do_not_depend_on_how_a_file_reads_and_missing_is_missing(tmp_path):
    """A zip code is text: '02134' in a training CSV and in a CSV of new rows (which pandas alone would read as the
    number 2134) is one value; pd.NA and NaN are missing (id 0)."""
    (tmp_path / "train.csv").write_text("zip,click\n02134,1\n10001,0\nunknown,1\n02134,0\n")
    (tmp_path / "new.csv").write_text("zip\n02134\n10001\n")
    spec = {"features": [{"name": "zip", "kind": "categorical", "dim": 2}], "labels": ["click"]}
    schema = TableSchema.from_spec(spec).fit(read_table(tmp_path / "train.csv"))
    assert schema.vocabularies["zip"] == ["02134", "10001", "unknown"]
    assert schema.inputs(read_table(tmp_path / "new.csv"))["zip"].tolist() == [1, 2]
    frame = pd.DataFrame({"zip": pd.array(["02134", pd.NA, "10001"], dtype="string"), "click": [1.0, 0.0, 1.0]})
    assert schema.inputs(frame)["zip"].tolist() == [1, 0, 2]
    numbers = pd.DataFrame({"code": pd.array([3, pd.NA, 5], dtype="Int64"), "click": [1.0, 0.0, 1.0]})
    coded = TableSchema.from_spec({"features": [{"name": "code", "kind": "categorical", "dim": 2}],
                                   "labels": ["click"]}).fit(numbers)
    assert coded.vocabularies["code"] == ["3", "5"]  # no "<NA>" category
    assert coded.inputs(pd.DataFrame({"code": [3.0, np.nan, 5.0]}))["code"].tolist() == [1, 0, 2]


def test_text_in_a_number_column_is_named_and_a_null_mean_is_learned(tmp_path):
    spec = json.loads(json.dumps(SPEC))
    spec["features"][3]["mean"] = None
    df = frame(20)
    schema = TableSchema.from_spec(spec).fit(df)
    assert schema.stats["age"][0] == pytest.approx(df.age.mean())
    (tmp_path / "bad.csv").write_text("user,item,history,age,click,watch\n1,hat,,30,1,2\n2,hat,,nan,0,1\n")
    with pytest.raises(ValueError, match="dense column 'age' holds 'nan' at row 1, not a number"):
        schema.inputs(read_table(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="label 'click' holds '1_000'"):
        schema.targets(df.astype({"click": object}).assign(click=["1_000"] * 20))
    with pytest.raises(ValueError, match="both vocabularies and stats"):
        TableSchema.from_spec({**schema.to_dict(), "stats": None})


def test_a_resume_keeps_the_events_of_the_records_its_checkpoint_kept(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmoe_fast import models

    df = frame(64)
    schema = TableSchema.from_spec(SPEC).fit(df)
    y, _ = schema.targets(df)
    x = schema.inputs(df)

    def run(**kw):
        torch.manual_seed(0)
        model = models.MMoE(schema.columns(), 2, task_types=schema.task_types)
        return fit(model, x, y, x_val=x, y_val=y, batch_size=32, lr=1e-30, progress=False, log=lambda _: None,
                   tensorboard=tmp_path / "tb", checkpoint_dir=tmp_path / "ck", **kw)

    first = run(epochs=6, patience=1)  # stops early at step 4 (no progress at this lr), checkpointing there
    assert [r["step"] for r in first] == [2, 4]
    again = run(epochs=6, patience=2, resume=tmp_path / "ck" / "step-0000004.pt")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("train_loss_task0")}) == [r["step"] for r in again]


def test_fit_reads_dataframes_through_a_table_schema():
    from mmoe_fast import models

    df, val = frame(120), frame(40, seed=1)
    df.loc[[3, 8], "click"] = np.nan
    schema = TableSchema.from_spec(SPEC).fit(df)

    def build():
        torch.manual_seed(0)
        return models.MMoE(schema.columns(), 2, task_types=schema.task_types)

    a, b = build(), build()
    y, mask = schema.targets(df)
    yv, mv = schema.targets(val)
    h1 = fit(a, schema.inputs(df), y, label_mask=mask, x_val=schema.inputs(val), y_val=yv, val_label_mask=mv,
             epochs=2, batch_size=32, progress=False, log=lambda _: None)
    h2 = fit(b, df, x_val=val, table=schema, epochs=2, batch_size=32, progress=False, log=lambda _: None)
    assert h1 == h2
    with pytest.raises(ValueError, match="give no y"):
        fit(build(), df, y, table=schema, steps=1)
