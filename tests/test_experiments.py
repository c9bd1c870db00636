"""The experiment commands on tiny settings, and the pieces they are built of."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import checkpoint, cli, experiments, gating, models

FIXTURE = str(Path(__file__).parent / "fixtures" / "census")
SYNTHETIC_TINY = ["--n-train", "200", "--n-val", "60", "--d", "10", "--epochs", "2", "--batch-size", "64",
                  "--no-progress"]
CENSUS_TINY = ["--census-path", FIXTURE, "--epochs", "1", "--batch-size", "16", "--no-progress"]


def _outputs(out: Path) -> tuple[dict, str]:
    for name in ("result.json", "table.md", "plot.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "result.json").read_text()), (out / "table.md").read_text()


def _table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_reproduce_correlation(tmp_path, capsys):
    out = tmp_path / "corr"
    rc = cli.main(["reproduce", "correlation", "--models", "mmoe,shared-bottom", "--p", "1.0,0.0", "--seeds", "2",
                   *SYNTHETIC_TINY, "--out", str(out)])
    assert rc == 0
    result, table = _outputs(out)
    rows = _table_rows(table)
    assert [r[0] for r in rows] == ["mmoe", "shared-bottom"]
    assert "p = 1.0" in table and "p = 0.0" in table and table in capsys.readouterr().out
    assert "alpha, beta fixed by task seed 0" in table and result["settings"]["task_seed"] == 0
    # Each model's lr: the grid value whose pilot (its own seed, the middle p) ended lowest; the runs use it.
    assert len(result["pilots"]) == 2 * 3 and {r["seed"] for r in result["pilots"]} == {10_000}
    for name in ("mmoe", "shared-bottom"):
        tried = [r for r in result["pilots"] if r["model"] == name]
        best = min(tried, key=lambda r: r["final_val_loss"])["lr"]
        assert result["settings"]["learning_rates"][name] == best
        assert {r["lr"] for r in result["runs"] if r["model"] == name} == {best}
    assert "lr per model from a pilot over 0.0001, 0.001, 0.01" in table
    assert "vs mmoe" in rows[1][1] and "vs mmoe" not in rows[0][1]
    assert len(result["runs"]) == 2 * 2 * 2 and len(result["runs"][0]["history"]) == 2
    assert set(result["summary"]) == {"mmoe@1.0", "mmoe@0.0", "shared-bottom@1.0", "shared-bottom@0.0"}
    # The paired difference is the mean over seeds of (shared-bottom - mmoe) on the same data.
    val = {(r["model"], r["seed"]): r["final_val_loss"] for r in result["runs"] if r["correlation"] == 0.0}
    diffs = [val["shared-bottom", s] - val["mmoe", s] for s in (0, 1)]
    cell = result["summary"]["shared-bottom@0.0"]
    assert cell["val_loss_minus_mmoe"] == pytest.approx(np.mean(diffs)) and cell["pairs"] == 2
    assert cell["val_loss_minus_mmoe_se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(2))
    assert (out / "mmoe_p1.0.pt").exists() and (out / "shared-bottom_p0.0.pt").exists()
    assert mf.checkpoint.read(out / "mmoe_p1.0.pt")["data"]["task_seed"] == 0
    def mmoe_loss(p):
        return np.mean([r["final_val_loss"] for r in result["runs"] if r["model"] == "mmoe" and r["correlation"] == p])

    mmoe_change = mmoe_loss(0.0) - mmoe_loss(1.0)
    assert result["summary"]["mmoe@0.0"]["val_loss_change_from_p1.0"] == pytest.approx(mmoe_change)
    assert "Change of validation loss from p = 1.0 to p = 0.0" in table and ("Here: held" in table
                                                                            or "Here: not held" in table)


def test_reproduce_shared_bottom_is_figure_3(tmp_path, capsys):
    out = tmp_path / "sb"
    rc = cli.main(["reproduce", "shared-bottom", "--p", "1.0,0.9,0.5", "--seeds", "3", "--lr", "0.01",
                   *SYNTHETIC_TINY, "--out", str(out)])
    assert rc == 0
    result, table = _outputs(out)
    assert [r[0] for r in _table_rows(table)] == ["1.0", "0.9", "0.5"] and table in capsys.readouterr().out
    assert {r["model"] for r in result["runs"]} == {"shared-bottom"} and len(result["runs"]) == 3 * 3
    at = {p: {r["seed"]: r["final_val_loss"] for r in result["runs"] if r["correlation"] == p} for p in (1.0, 0.5)}
    diffs = [at[0.5][s] - at[1.0][s] for s in (0, 1, 2)]
    cell = result["summary"]["0.5"]
    assert cell["val_loss_minus_p1.0"] == pytest.approx(np.mean(diffs)) and cell["pairs"] == 3
    assert cell["val_loss_minus_p1.0_se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(3))
    assert "Paper (Figure 3)" in table and ("Here: held" in table or "Here: not held" in table)
    assert (out / "plot.png").stat().st_size > 0 and (out / "shared-bottom_p1.0.pt").exists()


def test_reproduce_correlation_can_redraw_the_tasks_per_run_and_fix_the_lr(tmp_path):
    out = tmp_path / "corr"
    assert cli.main(["reproduce", "correlation", "--models", "mmoe", "--p", "0.5", "--seeds", "2", "--redraw-tasks",
                     "--lr", "0.003", *SYNTHETIC_TINY, "--out", str(out)]) == 0
    result, table = _outputs(out)
    assert result["settings"]["task_seed"] is None and "redrawn with each run's data" in table
    assert result["pilots"] == [] and "lr 0.003 for every model" in table
    assert {r["lr"] for r in result["runs"]} == {0.003}


def test_a_diverging_pilot_counts_as_worst(monkeypatch):
    from mmoe_fast.experiments import synthetic

    def fake_runs(name, runs, *, epochs, batch_size, progress, **kw):
        return [(None, {"history": [], "error": "diverged"} if lr == 1e-2 else
                 {"history": [{"val_loss": [lr * 100, lr * 100]}], "error": None}) for _, _, lr in runs]

    monkeypatch.setattr(synthetic, "train_runs", fake_runs)
    args = argparse.Namespace(lr=None, lr_grid=[1e-3, 1e-4, 1e-2], p=[0.0, 0.5, 1.0], seed=0, models=["mmoe"],
                              epochs=1, batch_size=8, d=5, n_train=20, n_val=10, data_seed=None, task_seed=0)
    lrs, pilots = synthetic.pilot_learning_rates(args)
    assert lrs == {"mmoe": 1e-4} and [r["final_val_loss"] for r in pilots][2] == float("inf")
    assert {r["correlation"] for r in pilots} == {0.5}


def test_the_pilot_draws_its_own_data_under_data_seed(monkeypatch):
    from mmoe_fast.experiments import synthetic

    specs = []
    monkeypatch.setattr(synthetic, "load_splits", lambda spec: specs.append(spec) or {})
    monkeypatch.setattr(synthetic, "train_runs", lambda name, runs, **k: [
        (None, {"history": [{"val_loss": [1.0]}], "error": None}) for _ in runs])
    args = argparse.Namespace(lr=None, lr_grid=[1e-3], p=[0.5], seed=3, models=["mmoe"], epochs=1, batch_size=8,
                              d=5, n_train=20, n_val=10, data_seed=7, task_seed=0)
    synthetic.pilot_learning_rates(args)
    assert specs[0]["seed"] == 3 + synthetic.PILOT_SEED_OFFSET != 7


def test_the_verdict_needs_standard_errors():
    from mmoe_fast.experiments import synthetic

    runs = {("mmoe", 1.0): 0.10, ("mmoe", 0.0): 0.11, ("omoe", 1.0): 0.10, ("omoe", 0.0): 0.30}
    args = argparse.Namespace(p=[1.0, 0.0], models=["mmoe", "omoe"], epochs=1, n_train=10)
    summary = {f"{m}@{p}": {} for m in ("mmoe", "omoe") for p in (1.0, 0.0)}
    text = synthetic.correlation_verdict(
        args, lambda name, p: [{"seed": 0, "final_val_loss": runs[name, p]}], summary)
    assert "undetermined" in text


def test_paired_differences_and_standard_errors():
    from mmoe_fast.experiments.common import mean_se, paired

    diff, se, n = paired({0: 1.0, 1: 2.0, 2: 4.0, 5: 9.0}, {0: 0.5, 1: 1.0, 2: 3.0})
    assert (diff, n) == (pytest.approx(np.mean([0.5, 1.0, 1.0])), 3)
    assert se == pytest.approx(np.std([0.5, 1.0, 1.0], ddof=1) / np.sqrt(3))
    assert np.isnan(paired({0: 1.0}, {0: 2.0})[1]) and paired({0: 1.0}, {1: 1.0})[2] == 0
    assert mean_se([1.0, 3.0]) == (2.0, pytest.approx(1.0))


def test_reproduce_trainability(tmp_path):
    out = tmp_path / "train"
    rc = cli.main(["reproduce", "trainability", "--models", "mmoe,omoe", "--p", "0.5", "--runs", "3",
                   "--data-seed", "7", *SYNTHETIC_TINY, "--out", str(out)])
    assert rc == 0
    result, table = _outputs(out)
    assert "initialization varies" in table and result["settings"]["data_seed"] == 7
    rows = _table_rows(table)
    assert [(r[0], r[1], r[2]) for r in rows] == [("0.5", "mmoe", "3"), ("0.5", "omoe", "3")]
    losses = [r["final_val_loss"] for r in result["runs"] if r["model"] == "mmoe"]
    assert result["summary"]["mmoe@0.5"]["min"] == pytest.approx(min(losses))


@pytest.fixture(scope="module")
def census_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("census")
    assert cli.main(["reproduce", "census", "--group", "1", "--runs", "2", *CENSUS_TINY, "--out", str(out)]) == 0
    return out


def test_reproduce_census(census_run):
    result, table = _outputs(census_run)
    rows = _table_rows(table)
    assert [r[0] for r in rows] == list(experiments.DEFAULT_CENSUS_MODELS)
    assert rows[0][-1] == "0.9410 / 0.9359"  # the paper's MMoE beside ours
    assert all(r[1] == "2" for r in rows)
    for name in experiments.DEFAULT_CENSUS_MODELS:
        mine = [r for r in result["runs"] if r["model"] == name]
        best = max(mine, key=lambda r: r["val"][0]["auc"])
        assert result["summary"][name]["income_best"] == best["test"][0]["auc"]
        assert result["summary"][name]["income_mean"] == pytest.approx(np.mean([r["test"][0]["auc"] for r in mine]))
        assert (census_run / f"best_{name}.pt").exists()
        if name != "mmoe":  # paired by seed with MMoE
            base = {r["seed"]: r["test"][0]["auc"] for r in result["runs"] if r["model"] == "mmoe"}
            diffs = [r["test"][0]["auc"] - base[r["seed"]] for r in mine]
            assert result["summary"][name]["income_minus_mmoe"] == pytest.approx(np.mean(diffs))
            assert result["summary"][name]["pairs"] == 2
    assert result["claim"]["text"] in table and result["claim"]["held"] in (True, False)
    assert sorted(result["claim"]["below"] + result["claim"]["level"] + result["claim"]["above"]) == sorted(
        experiments.DEFAULT_CENSUS_MODELS[1:])


def test_the_census_claim_is_judged_by_paired_differences_and_two_standard_errors():
    from mmoe_fast.experiments.census import census_claim

    def summary(**diffs):
        return {"mmoe": {}, **{n: {"income_minus_mmoe": d, "income_minus_mmoe_se": se} for n, (d, se) in diffs.items()}}

    claim = census_claim(summary(a=(-0.003, 0.001), b=(-0.001, 0.001)), "mmoe", "income")
    assert (claim["held"], claim["below"], claim["level"]) == (False, ["a"], ["b"])  # b within two SE: level
    assert "not held (below mmoe: a; level with mmoe: b)" in claim["text"]
    assert census_claim(summary(a=(-0.003, 0.001)), "mmoe", "income")["held"] is True
    assert census_claim(summary(a=(-0.003, 0.001), c=(0.0021, 0.001)), "mmoe", "income")["above"] == ["c"]
    assert census_claim(summary(a=(-0.003, float("nan"))), "mmoe", "income")["held"] is None  # one pair: no SE
    assert census_claim(summary(), "mmoe", "income")["held"] is None  # nothing to compare


def test_census_lr_grid_gives_every_method_the_same_pilots(tmp_path):
    out = tmp_path / "lr"
    assert cli.main(["reproduce", "census", "--models", "mmoe,shared-bottom", "--runs", "1", "--lr-grid", "0.001,0.1",
                     "--encoding", "ids", "--embedding-dim", "vocab", *CENSUS_TINY, "--out", str(out)]) == 0
    result, table = _outputs(out)
    pilots = result["pilots"]
    assert [(p["model"], p["lr"]) for p in pilots] == [("mmoe", 0.001), ("mmoe", 0.1), ("shared-bottom", 0.001),
                                                       ("shared-bottom", 0.1)]
    assert {p["seed"] for p in pilots} == {10_000} and 10_000 not in {r["seed"] for r in result["runs"]}
    for name in ("mmoe", "shared-bottom"):
        best = max((p for p in pilots if p["model"] == name), key=lambda p: p["score"])["lr"]
        assert result["settings"]["learning_rates"][name] == best
        assert [r["history"][-1]["lr"] for r in result["runs"] if r["model"] == name] == [best]
    assert "lr per method from a pilot run per value of 0.001, 0.1" in table and "2 runs and 4 pilots" in table
    assert "31 categorical as vocabulary-wide embeddings" in table


def test_gates_from_a_census_checkpoint(census_run, tmp_path):
    out = tmp_path / "gates"
    assert cli.main(["gates", str(census_run / "best_mmoe.pt"), "--split", "test", "--out", str(out)]) == 0
    result, table = _outputs(out)
    rows = _table_rows(table)
    assert [r[0] for r in rows] == ["income", "never_married"] and len(rows[0]) == 1 + 8 + 1  # + entropy
    np.testing.assert_allclose(np.sum(result["mean_gate_weights"], axis=1), 1.0, rtol=1e-6)
    assert result["rows"] == 16

    assert cli.main(["gates", str(census_run / "best_omoe.pt"), "--out", str(tmp_path / "omoe")]) == 0
    assert [r[0] for r in _table_rows((tmp_path / "omoe" / "table.md").read_text())] == ["shared gate"]


def test_gates_refuses_a_model_without_gates_or_other_data(census_run, tmp_path, capsys):
    assert cli.main(["gates", str(census_run / "best_shared-bottom.pt"), "--out", str(tmp_path)]) == 2
    assert "has no gates (MMoE, OMoE, CGC and PLE have them)" in capsys.readouterr().err
    mf.save(models.MMoE(3, 2), tmp_path / "small.pt", data={"name": "census", "group": 1, "path": FIXTURE})
    assert cli.main(["gates", str(tmp_path / "small.pt"), "--out", str(tmp_path)]) == 2
    assert "checkpoint's model takes 3" in capsys.readouterr().err


def test_tune_skips_oversized_configs_and_saves_the_best(tmp_path, capsys):
    out = tmp_path / "tune"
    rc = cli.main(["tune", "--experts", "2,4", "--expert-hidden", "4,1024", "--lr", "0.01", *CENSUS_TINY,
                   "--out", str(out)])
    assert rc == 0
    assert "skipped (more than 2048 expert units): [(4, 1024)]" in capsys.readouterr().out
    result, table = _outputs(out)
    rows = _table_rows(table)
    assert sorted((r[1], r[2]) for r in rows) == [("2", "1024"), ("2", "4"), ("4", "4")]
    assert [r[0] for r in rows].count("**best**") == 1 and rows[0][0] == "**best**"
    assert result["best"]["score"] == max(r["score"] for r in result["runs"])
    model = mf.load(out / "best.pt")
    assert (model.mixture.num_experts, model.mixture.expert_hidden) == (
        result["best"]["num_experts"], (result["best"]["expert_hidden"],))


def test_tune_on_synthetic_selects_on_validation_mse(tmp_path):
    rc = cli.main(["tune", "--data", "synthetic", "--experts", "2", "--expert-hidden", "4,8", "--lr", "0.01",
                   *SYNTHETIC_TINY, "--out", str(tmp_path)])
    assert rc == 0
    result, table = _outputs(tmp_path)
    assert "val MSE" in table
    assert result["best"]["val"][0]["mse"] == min(r["val"][0]["mse"] for r in result["runs"])


def test_missing_census_data_says_what_to_run(tmp_path, capsys):
    assert cli.main(["reproduce", "census", "--census-path", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "make census-data" in capsys.readouterr().err


def test_models_option_takes_registry_names_only():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["reproduce", "correlation", "--models", "mmoe,nope"])
    args = cli.build_parser().parse_args(["reproduce", "census", "--models", ",".join(models.MODELS)])
    assert args.models == list(models.MODELS)


def test_every_registered_model_builds_for_the_experiments():
    for name in sorted(models.MODELS):
        kinds = [("binary",) * 2]
        if name != "esmm":
            kinds.append(("regression",) * 2)
        for task_types in kinds:
            model = models.build_model(name, 7, 2, task_types=task_types)
            assert model(torch.randn(3, 7)).shape == (3, 2) and tuple(model.task_types) == task_types


def test_main_score_is_higher_for_better_models():
    assert experiments.main_score({"auc": 0.9}) == 0.9
    assert experiments.main_score({"mse": 0.5, "r2": 0.1}) == -0.5


def test_mean_gate_weights_is_the_mean_softmax(tmp_path):
    model = models.MMoE(6, 2, num_experts=3, expert_hidden=4)
    x = torch.randn(40, 6)
    layer = model.mixture
    logits = torch.einsum("bd,tde->bte", x, layer.gate_weight) + layer.gate_bias
    want = torch.softmax(logits, dim=-1).mean(dim=0).double()
    torch.testing.assert_close(experiments.mean_gate_weights(model, x, batch_size=7), want, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_keeps_the_data_spec(tmp_path):
    model = models.MMoE(6, 2, num_experts=3, expert_hidden=4, task_types=("binary", "regression"))
    spec = {"name": "synthetic", "correlation": 0.5, "d": 6, "n_train": 10, "n_val": 5, "seed": 0}
    mf.save(model, tmp_path / "m.pt", data=spec)
    ckpt = checkpoint.read(tmp_path / "m.pt")
    loaded = checkpoint.model_from(ckpt, tmp_path / "m.pt")
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert ckpt["data"] == spec and ckpt["model"] == "mmoe" and loaded.task_types == ("binary", "regression")
    torch.save({"model": model.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an mmoe_fast checkpoint"):
        mf.load(tmp_path / "other.pt")


def test_gates_reads_the_model_that_train_writes(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert cli.main(["train", "--n-train", "100", "--n-val", "40", "--d", "6", "--experts", "3", "--epochs", "1",
                     "--no-progress", "--checkpoint-dir", str(ckpt)]) == 0
    out = tmp_path / "gates"
    assert cli.main(["gates", str(ckpt / "model.pt"), "--out", str(out)]) == 0
    result, table = _outputs(out)
    assert [r[0] for r in _table_rows(table)] == ["task0", "task1"] and result["rows"] == 40
    assert np.shape(result["mean_gate_weights"]) == (2, 3)
    assert cli.main(["gates", str(ckpt / "step-0000001.pt"), "--out", str(tmp_path / "step")]) == 0


def test_gate_tables_of_ple_match_a_hand_computed_forward():
    """Per level: task gates spread over all experts (zero outside a task's own and the shared ones), the inner
    level's shared gate last, each level's gates computed on the previous level's output; entropies and
    collapse warnings from the same weights."""
    torch.manual_seed(0)
    model = models.PLE(5, 2, num_levels=2, num_specific_experts=2, num_shared_experts=1, expert_hidden=4,
                       backend="reference")
    x = torch.randn(23, 5)
    tables = experiments.gate_tables(model, x, ["a", "b"], batch_size=6)
    assert [t.title for t in tables] == ["level 0: ", "level 1: "]
    assert tables[0].gates == ["a", "b", "shared"] and tables[1].gates == ["a", "b"]
    assert tables[0].experts == ["a:0", "a:1", "b:0", "b:1", "shared:0"]
    level0 = model.levels[0]
    task = torch.softmax(torch.einsum("bd,tde->bte", x, level0.task_gate_weight) + level0.task_gate_bias, dim=-1)
    shared = torch.softmax(x @ level0.shared_gate_weight[0] + level0.shared_gate_bias[0], dim=-1)
    want = torch.zeros(3, 5, dtype=torch.float64)
    want[0, [0, 1, 4]] = task[:, 0].double().mean(0)
    want[1, [2, 3, 4]] = task[:, 1].double().mean(0)
    want[2] = shared.double().mean(0)
    torch.testing.assert_close(tables[0].weights, want, rtol=1e-5, atol=1e-7)
    h = -(task * task.log()).sum(-1).double() / np.log(3)
    torch.testing.assert_close(tables[0].entropy[:2], h.mean(0), rtol=1e-5, atol=1e-7)
    h1 = model.levels[1].full_gates(level0(x)).double().mean(0)
    torch.testing.assert_close(tables[1].weights, h1, rtol=1e-5, atol=1e-7)
    assert tables[0].warnings() == []
    collapsed = gating.GateTable("", ["a"], ["0", "1", "2"], torch.tensor([[0.95, 0.05, 0.0]]),
                                            torch.tensor([0.1]), [3])
    assert collapsed.warnings() == ["a's gate has collapsed: 0.95 of its weight on expert 0",
                                    "experts no gate uses (under 0.01 of every gate's weight): 2"]
    single = gating.GateTable("", ["a"], ["0"], torch.tensor([[1.0]]), torch.tensor([0.0]), [1])
    assert single.warnings() == []  # a gate of one expert cannot collapse


def test_gates_command_on_a_cgc_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert cli.main(["train", "--model", "cgc", "--n-train", "100", "--n-val", "40", "--d", "6", "--epochs", "1",
                     "--no-progress", "--checkpoint-dir", str(ckpt)]) == 0
    assert cli.main(["gates", str(ckpt / "model.pt"), "--out", str(tmp_path / "gates")]) == 0
    result, table = _outputs(tmp_path / "gates")
    assert result["gates"] == ["task0", "task1"] and len(result["levels"]) == 1
    assert result["levels"][0]["experts"][:3] == ["task0:0", "task0:1", "task0:2"]
    np.testing.assert_allclose(np.sum(result["mean_gate_weights"], axis=1), 1.0, rtol=1e-6)
    assert "entropy" in table and all(0 <= h <= 1 for h in result["levels"][0]["entropy"])


def test_reproduce_labels_figure_2(tmp_path):
    out = tmp_path / "labels"
    rc = cli.main(["reproduce", "labels", "--p=-1.0,0.0,0.5,1.0", "--seeds", "3", "--n-train", "400", "--d", "5",
                   "--out", str(out)])
    assert rc == 0
    result, table = _outputs(out)
    assert [len(v) for v in result["values"].values()] == [3] * 4
    s = result["summary"]
    # p = 1: both tasks have one weight vector, so the labels differ only by the noise; p = 0 lies between.
    assert s["1.0"]["mean"] > 0.99 and s["-1.0"]["mean"] < s["0.0"]["mean"] < s["1.0"]["mean"]
    assert s["0.5"]["min"] == pytest.approx(min(result["values"]["0.5"]))
    assert "Here the mean rises with p" in table and len(_table_rows(table)) == 4
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "labels", "--p", "1.5"])


@pytest.mark.parametrize("encoding, threads, want", [("onehot", None, 2), ("ids", None, 1), ("onehot", "1", 1),
                                                      ("ids", "2", 2)])
def test_census_threads_default_to_every_core_for_fit_many_jobs_and_one_for_runs_one_by_one(
        tmp_path, monkeypatch, encoding, threads, want):
    """One-hot runs train as fit_many jobs (their GEMMs use every core); feature-column runs one by one with fit
    (fastest on one thread); ``--threads`` overrides both, and the caller's thread count comes back."""
    from mmoe_fast.experiments import census

    seen, runs = [], census._runs
    monkeypatch.setattr(census, "_runs", lambda *a, **k: seen.append(torch.get_num_threads()) or runs(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["reproduce", "census", "--models", "mmoe", "--runs", "1", "--encoding", encoding,
                         *(["--threads", threads] if threads else []), *CENSUS_TINY, "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [want]


@pytest.mark.parametrize("command, option", [("correlation", "seeds"), ("shared-bottom", "seeds"),
                                             ("trainability", "runs"), ("census", "runs")])
def test_every_comparison_defaults_to_at_least_20_paired_runs_per_cell(command, option):
    args = cli.build_parser().parse_args(["reproduce", command])
    assert getattr(args, option) >= 20


@pytest.mark.parametrize("argv, want", [
    ([], (20, 3, None)),
    (["--full"], (50, 20, [1e-4, 1e-3, 1e-2])),
    (["--full", "--runs", "20", "--epochs", "3"], (20, 3, [1e-4, 1e-3, 1e-2])),  # given at the default: kept
    (["--runs", "7", "--lr-grid", "0.01"], (7, 3, [0.01])),
])
def test_full_replaces_only_the_options_not_given(monkeypatch, argv, want):
    from mmoe_fast.experiments import commands

    seen = []
    monkeypatch.setattr(commands, "reproduce_census", lambda args: seen.append(args) or 0)
    assert cli.main(["reproduce", "census", *argv]) == 0
    args = seen[0]
    assert (args.runs, args.epochs, args.lr_grid) == want
    assert type(args.runs) is int and type(args.epochs) is int  # plain values reach the command, not the markers
