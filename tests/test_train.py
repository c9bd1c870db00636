"""The trainer: losses and metrics against their formulas, one step against a hand-written step, exact resume,
early stopping, logs, bad inputs and the ``train`` command's flags."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmoe_fast as mf
from mmoe_fast import checkpoint, cli
from mmoe_fast.models import MMoE
from mmoe_fast.train import evaluate_metrics, fit, latest_checkpoint, task_losses, task_metrics

TASK_TYPES = ("binary", "regression")


def _data(n=60, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    label = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).float()
    return x, torch.stack([label, x[:, 1] - x[:, 2]], dim=1)


def _model(seed=0, cls=MMoE):
    torch.manual_seed(seed)
    return cls(6, 2, num_experts=3, expert_hidden=4, tower_hidden=(3,), task_types=TASK_TYPES, backend="reference")


class DropoutMMoE(MMoE):
    """Uses the global RNG in every step, so exact resume must restore it."""

    def forward(self, x):
        return super().forward(F.dropout(x, 0.2, self.training))


class L2MMoE(MMoE):
    """An ``extra_loss`` hook, as issue 7's L2-constrained model defines one."""

    def extra_loss(self):
        return 0.3 * sum(p.square().sum() for p in self.towers.parameters())


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_task_losses_are_bce_with_logits_and_mse():
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(50, 2, generator=g) * 3, torch.randn(50, generator=g)
    y = torch.stack([(torch.rand(50, generator=g) > 0.5).float(), v], dim=1)
    z64, y64 = z.double(), y.double()
    prob = torch.sigmoid(z64[:, 0])
    bce = -(y64[:, 0] * torch.log(prob) + (1 - y64[:, 0]) * torch.log(1 - prob))
    mse = (z64[:, 1] - y64[:, 1]) ** 2
    torch.testing.assert_close(task_losses(z, y, TASK_TYPES).double(), torch.stack([bce.mean(), mse.mean()]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(task_losses(z, y, TASK_TYPES, reduction="sum").double(),
                               torch.stack([bce.sum(), mse.sum()]), rtol=1e-6, atol=1e-5)


def test_task_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    scores = np.round(rng.standard_normal(80), 1)  # rounded: ties count one half in the AUC
    labels = (rng.random(80) < 0.4).astype(float)
    pred, target = rng.standard_normal(80), rng.standard_normal(80)
    pos, neg = scores[labels == 1], scores[labels == 0]
    auc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    mse = np.mean((pred - target) ** 2)
    r2 = 1 - np.sum((target - pred) ** 2) / np.sum((target - target.mean()) ** 2)
    out = torch.tensor(np.stack([scores, pred], 1))
    got = task_metrics(out, torch.tensor(np.stack([labels, target], 1)), TASK_TYPES)
    assert got[0]["auc"] == pytest.approx(auc, abs=1e-12)
    assert got[1]["mse"] == pytest.approx(mse, rel=1e-12) and got[1]["r2"] == pytest.approx(r2, rel=1e-12)
    one_class = task_metrics(out, torch.tensor(np.stack([np.ones(80), target], 1)), TASK_TYPES)
    assert math.isnan(one_class[0]["auc"])


def test_evaluate_metrics_in_batches_equals_one_pass():
    x, y = _data()
    model = _model()
    with torch.no_grad():
        whole = task_metrics(model(x), y, TASK_TYPES)
    got = evaluate_metrics(model, x, y, batch_size=7)
    assert got[0]["auc"] == pytest.approx(whole[0]["auc"], abs=1e-12)
    assert got[1]["mse"] == pytest.approx(whole[1]["mse"], rel=1e-6)


@pytest.mark.parametrize("optimizer, opt_cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
@pytest.mark.parametrize("cls", [MMoE, L2MMoE])
def test_one_step_equals_the_weighted_loss_step(optimizer, opt_cls, cls):
    x, y = _data()
    weights, lr, wd = (2.0, 0.5), 0.01, 0.1
    expected = _model(cls=cls)
    opt = opt_cls(expected.parameters(), lr=lr, weight_decay=wd)  # weight decay makes the step depend on scale
    out = expected(x)
    loss = (weights[0] * F.binary_cross_entropy_with_logits(out[:, 0], y[:, 0])
            + weights[1] * F.mse_loss(out[:, 1], y[:, 1]))
    if cls is L2MMoE:
        loss = loss + 0.3 * sum(p.square().sum() for p in expected.towers.parameters())
    loss.backward()
    opt.step()
    model = _model(cls=cls)
    history = fit(model, x, y, steps=1, batch_size=len(x), lr=lr, loss_weights=weights, optimizer=optimizer,
                  weight_decay=wd, progress=False, log=lambda _: None)
    for k, v in _params(expected).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert ("train_extra_loss" in history[0]) == (cls is L2MMoE)


def test_zero_loss_weight_leaves_that_tower_untouched():
    x, y = _data()
    model = _model()
    before = _params(model)
    fit(model, x, y, epochs=2, batch_size=16, loss_weights=[1.0, 0.0], progress=False, log=lambda _: None)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) == k.startswith("towers.towers.1."), k


def _run(tmp_path, name, model, x, y, seed=3, **kw):
    return fit(model, x[:48], y[:48], x_val=x[48:], y_val=y[48:], batch_size=10, lr=0.02, patience=4, seed=seed,
               progress=False, log=lambda _: None, log_dir=tmp_path / name / "log",
               checkpoint_dir=tmp_path / name / "ckpt", **kw)


def test_resume_continues_exactly_as_if_never_stopped(tmp_path):
    x, y = _data()
    straight = _model(cls=DropoutMMoE)
    history = _run(tmp_path, "straight", straight, x, y, steps=13)
    first = _model(cls=DropoutMMoE)
    _run(tmp_path, "stopped", first, x, y, steps=7)  # stops in the middle of epoch 2 (5 batches an epoch)
    assert latest_checkpoint(tmp_path / "stopped" / "ckpt").name == "step-0000007.pt"
    torch.manual_seed(123)  # the resumed run must restore the RNG and the weights, not rely on them
    resumed = _model(seed=9, cls=DropoutMMoE)
    resumed_history = _run(tmp_path, "resumed", resumed, x, y, steps=13, resume=tmp_path / "stopped" / "ckpt")
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert resumed_history == history
    for f in ("train.jsonl", "train.csv"):
        assert (tmp_path / "resumed" / "log" / f).read_text() == (tmp_path / "straight" / "log" / f).read_text()


def test_resume_refuses_a_different_batch_size_or_an_empty_folder(tmp_path):
    x, y = _data()
    _run(tmp_path, "a", _model(), x, y, steps=2)
    with pytest.raises(ValueError, match=r"batch_size 10 \(checkpoint\) vs 12 \(now\)"):
        fit(_model(), x[:48], y[:48], batch_size=12, resume=tmp_path / "a" / "ckpt", progress=False)
    with pytest.raises(FileNotFoundError, match="no step-"):
        fit(_model(), x[:48], y[:48], batch_size=10, resume=tmp_path / "a" / "log", progress=False)


def test_the_checkpoints_of_fit_load_as_models_and_only_steps_resume(tmp_path):
    x, y = _data()
    model = _model()
    _run(tmp_path, "a", model, x, y, steps=3, checkpoint_extra={"data": {"name": "synthetic"}})
    for name in ("model.pt", "step-0000003.pt"):
        loaded = mf.load(tmp_path / "a" / "ckpt" / name)
        assert torch.equal(loaded(x), model.eval()(x)), name
        assert checkpoint.read(tmp_path / "a" / "ckpt" / name)["data"] == {"name": "synthetic"}
    with pytest.raises(checkpoint.CheckpointError, match="no trainer state"):
        fit(_model(), x[:48], y[:48], batch_size=10, resume=tmp_path / "a" / "ckpt" / "model.pt", progress=False)


def test_early_stopping_stops_on_a_plateau():
    x, y = _data()
    lines = []
    history = fit(_model(), x[:48], y[:48], x_val=x[48:], y_val=y[48:], epochs=20, lr=0.0, patience=2,
                  progress=False, log=lines.append)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert any("early stop" in line for line in lines)


@pytest.mark.parametrize("main_task", [0, 1])
def test_early_stopping_restores_the_best_epoch(main_task):
    # Validation targets are the opposite of the training ones: the better the fit, the worse the metric.
    x, y = _data(n=200)
    y_val = torch.stack([1 - y[150:, 0], -y[150:, 1]], dim=1)
    model = _model()
    history = fit(model, x[:150], y[:150], x_val=x[150:], y_val=y_val, epochs=30, batch_size=16, lr=0.02,
                  main_task=main_task, patience=3, progress=False, log=lambda _: None)
    key = "auc" if main_task == 0 else "mse"
    values = [r["val_metrics"][main_task][key] for r in history]
    best = int(np.argmax(values) if key == "auc" else np.argmin(values))
    assert len(history) == best + 1 + 3 < 30
    assert evaluate_metrics(model, x[150:], y_val)[main_task][key] == pytest.approx(values[best], rel=1e-6)


def test_logs_are_json_lines_and_csv(tmp_path):
    x, y = _data()
    history = fit(_model(), x[:48], y[:48], x_val=x[48:], y_val=y[48:], steps=7, batch_size=10,
                  progress=False, log=lambda _: None, log_dir=tmp_path)
    assert [r["step"] for r in history] == [5, 7]  # steps replace epochs; the last epoch is partial
    assert [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()] == history
    header, *rows = (tmp_path / "train.csv").read_text().splitlines()
    assert header.split(",") == ["epoch", "step", "train_loss_task0", "train_loss_task1", "lr", "val_loss_task0",
                                 "val_loss_task1", "val_auc_task0", "val_mse_task1", "val_r2_task1"]
    assert len(rows) == 2 and float(rows[1].split(",")[7]) == pytest.approx(history[1]["val_metrics"][0]["auc"])


def test_non_finite_loss_raises_before_the_update():
    x, y = _data()
    model = _model()
    with torch.no_grad():
        model.towers.towers[1][0].bias[0] = float("inf")  # finite data, a model that already diverged
    before = _params(model)
    with pytest.raises(FloatingPointError, match="diverged at epoch 1, step 1: non-finite training loss"):
        fit(model, x, y, batch_size=len(x), progress=False, log=lambda _: None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(y=torch.zeros(59, 2)), "must be"),
    (dict(y=torch.zeros(60, 3)), "one column per task"),
    (dict(x_val=torch.zeros(5, 6)), "give both or neither"),
    (dict(loss_weights=[1.0]), "loss_weights"),
    (dict(loss_weights=[1.0, -1.0]), "loss_weights"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(main_task=2), "main_task"),
    (dict(patience=2), "patience"),
    (dict(checkpoint_every=5), "checkpoint_dir"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_are_refused(kwargs, match):
    x, y = _data()
    kwargs = {"y": y, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit(_model(), x, kwargs.pop("y"), progress=False, **kwargs)


def test_train_command_with_every_new_flag(tmp_path, capsys):
    args = ["train", "--n-train", "200", "--n-val", "50", "--dim", "8", "--experts", "2", "--expert-hidden", "4",
            "--batch-size", "50", "--loss-weights", "1,0.5", "--optimizer", "adamw", "--weight-decay", "0.01",
            "--patience", "3", "--log-dir", str(tmp_path / "log"), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--checkpoint-every", "3", "--threads", "1", "--no-progress", "--backend", "reference"]
    threads = torch.get_num_threads()
    assert cli.main([*args, "--steps", "6"]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "backend reference" in out and "epoch   2" in out and "task1 mse=" in out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.pt", "step-0000003.pt",
                                                                     "step-0000006.pt"]
    assert cli.main([*args, "--steps", "8", "--resume", str(tmp_path / "ckpt")]) == 0
    assert f"resumed from {tmp_path / 'ckpt' / 'step-0000006.pt'} at step 6" in capsys.readouterr().out
    assert len((tmp_path / "log" / "train.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--loss-weights", "1,x"])


def test_regression_metrics_equal_scikit_learn_for_constant_labels_too():
    from sklearn.metrics import mean_squared_error, r2_score

    for target, pred in ((torch.full((5, 1), 2.0), torch.full((5, 1), 2.0)),
                         (torch.full((5, 1), 2.0), torch.arange(5.0)[:, None]),
                         (torch.arange(5.0)[:, None], torch.arange(5.0)[:, None].flip(0))):
        got = task_metrics(pred, target, ["regression"])[0]
        assert got["mse"] == pytest.approx(mean_squared_error(target[:, 0], pred[:, 0]), rel=1e-12)
        assert got["r2"] == pytest.approx(r2_score(target[:, 0], pred[:, 0]), rel=1e-12, abs=1e-12)
