"""The trainer's practitioner options against hand-written references: per-task sample weights, label masks
(missing labels), gradient clipping, learning-rate schedulers (with exact resume), probabilities for every
model, and ``train --model esmm`` on click/conversion labels."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import TASK_TYPES, _data, _model  # tests/ is on sys.path: the trainer tests' data

from mmoe_fast import cli, models
from mmoe_fast.data import load_splits, synthetic_spec
from mmoe_fast.train import OPTIMIZERS, fit, label_weights, task_losses, task_metrics


def _quiet(**kw):
    return dict(progress=False, log=lambda _: None, **kw)


def _mask(n, seed=1):
    m = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[0] = True  # both tasks keep labels
    return m


def test_masked_task_losses_and_metrics_match_their_definitions():
    x, y = _data()
    out = torch.randn(60, 2, generator=torch.Generator().manual_seed(5))
    mask = _mask(60)
    y_nan = torch.where(mask, y, torch.nan)
    got = task_losses(out, y_nan, TASK_TYPES, mask=mask)
    m0, m1 = mask[:, 0], mask[:, 1]
    want = torch.stack([F.binary_cross_entropy_with_logits(out[m0, 0], y[m0, 0]), F.mse_loss(out[m1, 1], y[m1, 1])])
    torch.testing.assert_close(got, want)
    each = task_losses(out, y_nan, TASK_TYPES, reduction="none", mask=mask)
    assert each.shape == (60, 2) and torch.isfinite(each).all() and (each[~mask] == 0).all()
    metrics = task_metrics(out, y_nan, TASK_TYPES, mask=mask)
    assert metrics == task_metrics(out[m0], y[m0], TASK_TYPES)[:1] + task_metrics(out[m1], y[m1], TASK_TYPES)[1:]


def test_one_weighted_step_equals_the_hand_written_step():
    """Loss per task = sum over the batch of w * l, divided by the batch's rows; AdamW with weight decay, so
    the step depends on the loss's scale."""
    x, y = _data()
    weights, lr, wd = (2.0, 0.5), 0.01, 0.1
    sw = torch.rand(60, 2, generator=torch.Generator().manual_seed(2)) * 3
    mask = _mask(60)
    w = sw * mask
    expected = _model()
    opt = torch.optim.AdamW(expected.parameters(), lr=lr, weight_decay=wd)
    out = expected(x)
    y0 = torch.where(mask, y, 0.0)
    loss = (weights[0] * (w[:, 0] * F.binary_cross_entropy_with_logits(out[:, 0], y0[:, 0], reduction="none")).sum()
            + weights[1] * (w[:, 1] * (out[:, 1] - y0[:, 1]) ** 2).sum()) / 60
    loss.backward()
    opt.step()
    model = _model()
    history = fit(model, x, torch.where(mask, y, torch.nan), steps=1, batch_size=60, lr=lr, loss_weights=weights,
                  optimizer="adamw", weight_decay=wd, sample_weight=sw, label_mask=mask, **_quiet())
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    sums = [(w[:, 0] * F.binary_cross_entropy_with_logits(_model()(x)[:, 0], y0[:, 0], reduction="none")).sum(),
            (w[:, 1] * (_model()(x)[:, 1] - y0[:, 1]) ** 2).sum()]
    torch.testing.assert_close(torch.tensor(history[0]["train_loss"]),
                               torch.stack(sums).detach() / w.sum(0), rtol=1e-5, atol=1e-6)


def test_a_masked_label_contributes_nothing():
    """Whatever a masked target holds (NaN, 0, 1e6), training gives the same bits."""
    x, y = _data()
    mask = _mask(60)
    finals = []
    for filler in (torch.nan, 0.0, 1e6):
        model = _model()
        y_fill = torch.where(mask, y, torch.full_like(y, filler))
        y_fill[:, 0] = torch.where(mask[:, 0], y[:, 0], 0.0 if filler != filler else filler)  # binary: 0/1 or NaN
        fit(model, x[:48], y_fill[:48], x_val=x[48:], y_val=y_fill[48:], epochs=2, batch_size=16,
            label_mask=mask[:48], val_label_mask=mask[48:], **_quiet())
        finals.append(model.state_dict())
    for other in finals[1:]:
        for k, v in finals[0].items():
            assert torch.equal(other[k], v), k


def test_unit_sample_weights_are_the_unweighted_run():
    x, y = _data()
    a, b = _model(), _model()
    ha = fit(a, x, y, epochs=2, batch_size=16, **_quiet())
    hb = fit(b, x, y, epochs=2, batch_size=16, sample_weight=torch.ones(60), **_quiet())
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    assert ha[-1]["train_loss"] == pytest.approx(hb[-1]["train_loss"], rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sample_weight=torch.ones(59)), "sample_weight must be"),
    (dict(sample_weight=-torch.ones(60)), "finite and >= 0"),
    (dict(sample_weight=torch.full((60,), math.inf)), "finite and >= 0"),
    (dict(label_mask=torch.ones(60, 3, dtype=torch.bool)), "label_mask must be"),
    (dict(label_mask=torch.full((60, 2), 0.5)), "label_mask must be"),
    (dict(label_mask=torch.tensor([[True, False]] * 60)), "task1 has no labeled rows"),
    (dict(val_label_mask=torch.ones(10, 2, dtype=torch.bool)), "val_label_mask needs x_val"),
    (dict(clip_grad_norm=0.0), "clip_grad_norm must be"),
    (dict(clip_grad_norm=math.nan), "clip_grad_norm must be"),
])
def test_bad_weights_masks_and_clipping_are_refused(kwargs, match):
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        fit(_model(), x, y, steps=1, **_quiet(**kwargs))


def test_nan_labels_without_a_mask_say_how_to_mask_them():
    x, y = _data()
    y[3, 1] = torch.nan
    with pytest.raises(ValueError, match="label_mask"):
        fit(_model(), x, y, steps=1, **_quiet())
    label_weights(y, None, ~y.isnan())  # the suggested mask is accepted


def test_gradient_clipping_bounds_each_update(monkeypatch):
    """With a tiny clip, every step's gradient norm is at most the clip when the optimizer sees it."""
    x, y = _data()
    seen = []
    adam = OPTIMIZERS["adam"]  # the class fit uses
    step = adam.step

    def watched(self, *args, **kwargs):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]
                                                     if p.grad is not None]))
        seen.append(float(norm))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(adam, "step", watched)
    fit(_model(), x, y, steps=4, batch_size=16, clip_grad_norm=1e-3, **_quiet())
    assert len(seen) == 4 and max(seen) <= 1e-3 * (1 + 1e-5)
    seen.clear()
    fit(_model(), x, y, steps=4, batch_size=16, **_quiet())
    assert min(seen) > 1e-2  # unclipped, the norm is far above


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def test_scheduler_steps_after_every_update_and_is_recorded():
    x, y = _data()
    history = fit(_model(), x, y, epochs=2, batch_size=20, lr=0.1, scheduler=_step_lr, **_quiet())
    assert [r["lr"] for r in history] == pytest.approx([0.1 * 0.5**3, 0.1 * 0.5**6])


def _resumes_exactly(tmp_path, x, y, **kw):
    """A run stopped at step 4 and resumed (from other initial weights) ends as the run never stopped."""
    def run(name, model, **more):
        return fit(model, x, y, batch_size=10, lr=0.05, seed=1, checkpoint_dir=tmp_path / name, **_quiet(**kw, **more))

    straight = _model()
    history = run("straight", straight, steps=9)
    run("stopped", _model(), steps=4)
    resumed = _model(seed=5)
    assert run("resumed", resumed, steps=9, resume=tmp_path / "stopped") == history
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_resume_with_a_scheduler_continues_exactly(tmp_path):
    x, y = _data()
    _resumes_exactly(tmp_path, x, y, scheduler=_step_lr, clip_grad_norm=0.5, sample_weight=torch.linspace(0.5, 2, 60))
    with pytest.raises(ValueError, match="label_weights"):
        fit(_model(), x, y, batch_size=10, lr=0.05, seed=1, scheduler=_step_lr, clip_grad_norm=0.5, steps=9,
            resume=tmp_path / "stopped", **_quiet())


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_predict_proba_for_every_model(name):
    torch.manual_seed(0)
    types = ("binary", "binary") if name == "esmm" else ("binary", "regression")
    model = models.build_model(name, 7, 2, task_types=types)
    x = torch.randn(5, 7)
    out = model(x)
    proba = model.predict_proba(x)
    torch.testing.assert_close(proba[:, 0], torch.sigmoid(out[:, 0]))
    torch.testing.assert_close(proba[:, 1], torch.sigmoid(out[:, 1]) if types[1] == "binary" else out[:, 1])


def test_synthetic_click_conversion_labels_nest():
    spec = synthetic_spec(correlation=0.5, d=10, n_train=300, n_val=50, seed=0, labels="click_conversion")
    data = load_splits(spec)
    y = data["y_train"]
    assert data["task_types"] == ("binary", "binary") and data["task_names"] == ("task0", "task1")
    assert ((y == 0) | (y == 1)).all() and (y[:, 1] <= y[:, 0]).all() and 0 < y[:, 1].mean() < y[:, 0].mean() < 1
    assert "labels" not in synthetic_spec(correlation=0.5, d=10, n_train=3, n_val=1, seed=0)  # old specs stay equal
    with pytest.raises(ValueError, match="labels must be"):
        synthetic_spec(correlation=0.5, d=10, n_train=3, n_val=1, seed=0, labels="ranks")


def test_train_command_trains_esmm(capsys):
    assert cli.main(["train", "--model", "esmm", "--epochs", "1", "--n-train", "300", "--n-val", "100",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "click_conversion labels" in out and "task0 auc=" in out and "task1 auc=" in out


def test_numpy_and_pandas_inputs_train_like_tensors():
    x, y = _data()
    mask = _mask(60)
    a, b = _model(), _model()
    fit(a, x, y, epochs=2, batch_size=16, label_mask=mask, sample_weight=torch.linspace(0.5, 2, 60), **_quiet())
    fit(b, x.double().numpy(), y.numpy(), epochs=2, batch_size=16, label_mask=mask.numpy(),
        sample_weight=np.linspace(0.5, 2, 60), **_quiet())
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-6, atol=1e-7)

    class Frame:  # what fit reads of a pandas DataFrame (pandas is not a dependency)
        def __init__(self, array):
            self.array = array

        def to_numpy(self):
            return self.array

    c, d = _model(), _model()
    fit(c, Frame(x.numpy()), Frame(y.numpy()), epochs=1, batch_size=16, **_quiet())
    fit(d, x, y, epochs=1, batch_size=16, **_quiet())
    for k, v in c.state_dict().items():
        assert torch.equal(d.state_dict()[k], v), k
    with pytest.raises(TypeError, match="x must be a tensor, a NumPy array"):
        fit(_model(), x.tolist(), y, steps=1, **_quiet())
    with pytest.raises(TypeError, match="Python objects"):
        fit(_model(), np.array([["a"] * 6] * 60, dtype=object), y, steps=1, **_quiet())


def test_resume_refuses_a_new_lr_or_other_scheduler_settings_and_checks_old_checkpoints(tmp_path):
    from mmoe_fast import checkpoint

    x, y = _data()
    kw = dict(batch_size=10, seed=1, checkpoint_dir=tmp_path / "a", steps=4)
    fit(_model(), x, y, lr=0.05, scheduler=_step_lr, **_quiet(**kw))
    ckpt = tmp_path / "a" / "step-0000004.pt"
    with pytest.raises(ValueError, match=r"lr 0.05 \(checkpoint\) vs 0.5 \(now\)"):
        fit(_model(), x, y, lr=0.5, scheduler=_step_lr, resume=ckpt, **_quiet(batch_size=10, seed=1, steps=9))
    with pytest.raises(ValueError, match="scheduler StepLR.*gamma=0.5.*vs StepLR.*gamma=0.9"):
        fit(_model(), x, y, lr=0.05, resume=ckpt, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.9),
            **_quiet(batch_size=10, seed=1, steps=9))
    # A checkpoint from before these settings existed: its run had none of them.
    old = torch.load(ckpt, weights_only=False)
    for key in ("label_weights", "scheduler", "clip_grad_norm"):
        del old["trainer"]["options"][key]
    del old["trainer"]["scheduler"]
    torch.save(old, tmp_path / "old.pt")
    for extra, name in ((dict(sample_weight=torch.ones(60) * 2), "label_weights"), (dict(clip_grad_norm=1.0),
                        "clip_grad_norm"), (dict(scheduler=_step_lr), "scheduler")):
        with pytest.raises(ValueError, match=f"{name} None \\(checkpoint\\)"):
            fit(_model(), x, y, lr=0.05, resume=tmp_path / "old.pt", **_quiet(batch_size=10, seed=1, steps=9,
                                                                                **extra))
    assert checkpoint.read(tmp_path / "old.pt")["trainer"]["options"]["lr"] == 0.05


def test_uncertainty_weighting_step_equals_the_hand_written_step():
    """Kendall et al.: sum_t w_t (exp(-s_t) L_t + s_t), s_t learned from 0 by the same optimizer, no weight decay."""
    x, y = _data()
    weights, lr, wd = (2.0, 0.5), 0.01, 0.1
    expected = _model()
    s = torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW([{"params": expected.parameters()}, {"params": [s], "weight_decay": 0.0}], lr=lr,
                            weight_decay=wd)
    out = expected(x)
    losses = torch.stack([F.binary_cross_entropy_with_logits(out[:, 0], y[:, 0]), F.mse_loss(out[:, 1], y[:, 1])])
    (torch.tensor(weights) * (torch.exp(-s) * losses + s)).sum().backward()
    opt.step()
    model = _model()
    history = fit(model, x, y, steps=1, batch_size=60, lr=lr, loss_weights=weights, optimizer="adamw",
                  weight_decay=wd, loss_weighting="uncertainty", **_quiet())
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(history[0]["loss_log_variance"], dtype=torch.float64), s.detach().double())
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        fit(_model(), x, y, steps=1, loss_weighting="gradients", **_quiet())


@pytest.mark.parametrize("name", ["mmoe", "shared-bottom"])
def test_gradnorm_steps_equal_the_hand_written_steps(name):
    """Chen et al.: w_t learned from 1 to balance G_t = w_t ||dL_t/dW|| at the last shared layer W toward
    mean(G) r_t^alpha, renormalized to sum to T; the model trains on sum_t c_t w_t L_t."""
    x, y = _data()
    weights, lr, alpha = (2.0, 0.5), 0.05, 1.5

    def build():
        torch.manual_seed(0)
        if name == "mmoe":
            return _model()
        return models.SharedBottom(6, 2, bottom_hidden=5, tower_hidden=(3,), task_types=TASK_TYPES)

    expected = build()
    w = torch.ones(2, requires_grad=True)
    opt = torch.optim.Adam([{"params": expected.parameters()}, {"params": [w], "weight_decay": 0.0}], lr=lr)
    shared = expected.mixture.expert_weights[-1] if name == "mmoe" else expected.bottom[0].weight
    first = None
    for _ in range(3):
        out = expected(x)
        losses = torch.stack([F.binary_cross_entropy_with_logits(out[:, 0], y[:, 0]), F.mse_loss(out[:, 1], y[:, 1])])
        norms = torch.stack([torch.autograd.grad(loss, shared, retain_graph=True)[0].norm() for loss in losses])
        first = losses.detach() if first is None else first
        ratio = losses.detach() / first
        G = w.detach() * norms
        target = G.mean() * (ratio / ratio.mean()) ** alpha
        opt.zero_grad()
        (torch.tensor(weights) * w.detach() * losses).sum().backward()
        w.grad = torch.sign(G - target) * norms
        opt.step()
        with torch.no_grad():
            w.clamp_(min=0).mul_(2 / w.sum())
    model = build()
    history = fit(model, x, y, steps=3, batch_size=60, lr=lr, loss_weights=weights, loss_weighting="gradnorm",
                  **_quiet())
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    got = torch.tensor(history[-1]["loss_task_weight"])
    torch.testing.assert_close(got, w.detach(), rtol=1e-5, atol=1e-6)
    assert got.sum() == pytest.approx(2.0) and not torch.equal(got, torch.ones(2))
    with pytest.raises(ValueError, match="not for PLE"):
        fit(models.PLE(6, 2, task_types=TASK_TYPES), x, y, steps=1, loss_weighting="gradnorm", **_quiet())
    with pytest.raises(ValueError, match="gradnorm_alpha"):
        fit(build(), x, y, steps=1, loss_weighting="gradnorm", gradnorm_alpha=-1.0, **_quiet())


def test_resume_with_gradnorm_continues_exactly(tmp_path):
    x, y = _data()
    _resumes_exactly(tmp_path, x, y, loss_weighting="gradnorm", gradnorm_alpha=0.5)
    with pytest.raises(ValueError, match=r"gradnorm_alpha 0.5 \(checkpoint\) vs 1.5 \(now\)"):
        fit(_model(), x, y, batch_size=10, lr=0.05, seed=1, steps=9, loss_weighting="gradnorm",
            resume=tmp_path / "stopped", **_quiet())


def test_resume_with_uncertainty_weighting_continues_exactly(tmp_path):
    x, y = _data()
    _resumes_exactly(tmp_path, x, y, loss_weighting="uncertainty", weight_decay=0.01, optimizer="adamw")
    with pytest.raises(ValueError, match=r"loss_weighting uncertainty \(checkpoint\) vs static \(now\)"):
        fit(_model(), x, y, batch_size=10, lr=0.05, seed=1, steps=9, optimizer="adamw", weight_decay=0.01,
            resume=tmp_path / "stopped", **_quiet())


class _FitOrder(torch.utils.data.Sampler):
    """fit's own batch order (a fresh permutation of one seeded generator every epoch), as a DataLoader sampler."""

    def __init__(self, n, seed):
        self.n, self.gen = n, torch.Generator().manual_seed(seed)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.gen).tolist())

    def __len__(self):
        return self.n


@pytest.mark.parametrize("backend", ["reference", "auto"])  # autograd's step, and fit's fused one
def test_a_dataloader_in_fits_order_trains_like_the_tensors(backend):
    x, y = _data()
    w = torch.linspace(0.5, 2, 60)
    xv, yv = _data(30, seed=1)
    for weighted in (False, True):
        a, b = _model(), _model()
        a.mixture.backend = b.mixture.backend = backend
        ds = torch.utils.data.TensorDataset(x, y, w) if weighted else torch.utils.data.TensorDataset(x, y)
        loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=_FitOrder(60, seed=3))
        h1 = fit(a, x, y, x_val=xv, y_val=yv, epochs=3, batch_size=16, seed=3,
                 sample_weight=w if weighted else None, **_quiet())
        h2 = fit(b, loader, x_val=xv, y_val=yv, epochs=3, **_quiet())
        for k, v in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-6, atol=1e-7)
        assert [r["step"] for r in h1] == [r["step"] for r in h2] == [4, 8, 12]
        for r1, r2 in zip(h1, h2):
            assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-6)
            assert r1["val_loss"] == pytest.approx(r2["val_loss"], rel=1e-6)


def test_a_dataloader_without_length_needs_steps_and_bad_batches_are_named():
    x, y = _data()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    stream = torch.utils.data.DataLoader(Stream(), batch_size=16)
    with pytest.raises(ValueError, match="give steps"):
        fit(_model(), stream, **_quiet())
    history = fit(_model(), stream, steps=6, **_quiet())  # 4 batches an epoch: 2 epochs, the last one partial
    assert [r["step"] for r in history] == [4, 6]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with pytest.raises(ValueError, match="y must be None"):
        fit(_model(), loader, y, **_quiet())
    with pytest.raises(ValueError, match="resume needs tensor inputs"):
        fit(_model(), loader, resume="somewhere", **_quiet())
    bad = y.clone()
    bad[40, 1] = float("nan")
    with pytest.raises(ValueError, match="DataLoader batch 3 of epoch 1: y: task1"):
        fit(_model(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, bad), batch_size=16), **_quiet())
    with pytest.raises(TypeError, match=r"expected \(x, y\) or \(x, y, sample_weight\), got list of 1"):
        fit(_model(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16), **_quiet())
    with pytest.raises(ValueError, match=r"y must be \[B, 2\]"):
        fit(_model(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y[:, :1]), batch_size=16),
            **_quiet())


def test_gradnorm_weight_gradient_follows_its_formula_for_each_alpha():
    from mmoe_fast.train import _GradNorm

    x, y = _data()
    grads = {}
    for alpha in (0.0, 1.5, 3.0):
        model = _model()
        gn = _GradNorm(model, alpha, "cpu")
        with torch.no_grad():
            gn.weights.copy_(torch.tensor([0.7, 1.3]))
        for scale in (1.0, torch.tensor([0.5, 0.9])):  # the first call sets L(0); the second sees other ratios
            out = model(x)
            losses = torch.stack([F.binary_cross_entropy_with_logits(out[:, 0], y[:, 0]),
                                  F.mse_loss(out[:, 1], y[:, 1])]) * scale
            got = gn.weight_grad(losses)
        W = model.mixture.expert_weights[-1]
        norms = torch.stack([torch.autograd.grad(loss, W, retain_graph=True)[0].norm() for loss in losses])
        ratio = losses.detach() / (losses.detach() / scale)
        G = torch.tensor([0.7, 1.3]) * norms
        want = torch.sign(G - G.mean() * (ratio / ratio.mean()) ** alpha) * norms
        torch.testing.assert_close(got, want)
        grads[alpha] = got
    assert not torch.equal(grads[0.0], grads[3.0])  # alpha changes which task is pushed up


def test_a_dataloaders_sample_weights_are_checked_by_batch():
    x, y = _data()
    bad = torch.ones(60)
    bad[20] = -1.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, bad), batch_size=16)
    with pytest.raises(ValueError, match="DataLoader batch 2 of epoch 1: sample_weight must be finite and >= 0"):
        fit(_model(), loader, **_quiet())
    zero_task = torch.ones(60, 2)
    zero_task[:16, 1] = 0  # one batch without a label of task1: allowed (a data set without one is not)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, zero_task), batch_size=16)
    assert len(fit(_model(), loader, epochs=1, **_quiet())) == 1


@pytest.mark.parametrize("name", ["mmoe", "omoe", "ple"])
def test_logged_gates_are_the_gate_tables_of_that_epoch(name):
    from mmoe_fast import gating

    x, y = _data(80)
    model = models.build_model(name, 6, 2, task_types=TASK_TYPES)
    said = []
    history = fit(model, x, y, x_val=x[:50], y_val=y[:50], epochs=1, batch_size=16, progress=False,
                  log=said.append, log_gates=True)
    tables = gating.gate_tables(model, x[:50], ["task0", "task1"])
    got_mean, got_h = history[-1]["gate_mean"], history[-1]["gate_entropy"]
    want = [(t.title, g, w, h) for t in tables for g, w, h in zip(t.gates, t.weights.tolist(), t.entropy.tolist())]
    assert len(got_mean) == len(want) == len(got_h)
    for (title, gate, w, h), key in zip(want, got_mean):
        assert key.endswith(gate.replace(" ", "_")) and (not title or key.startswith(title[:5].replace(" ", "")))
        np.testing.assert_allclose(got_mean[key], w, rtol=1e-12)
        assert got_h[key] == pytest.approx(h, rel=1e-12)
    assert "gate entropy" in said[-1]
    if name == "omoe":
        assert list(got_mean) == ["shared_gate"]


def test_a_collapsing_gate_is_warned_once_and_gateless_models_are_refused(tmp_path):
    x, y = _data(64)
    model = models.build_model("mmoe", 6, 2, task_types=TASK_TYPES)
    with torch.no_grad():
        model.mixture.gate_bias[0, 1] = 50.0  # task0's gate: all on expert 1, whatever x
    said = []
    history = fit(model, x, y, epochs=3, batch_size=32, lr=1e-4, progress=False, log=said.append, log_gates=True,
                  log_dir=tmp_path)
    warnings = [s for s in said if s.startswith("warning:")]
    assert len(warnings) == 1 and "epoch 1: task0's gate has collapsed" in warnings[0] and "expert 1" in warnings[0]
    assert history[0]["gate_mean"]["task0"][1] > 0.99 and history[0]["gate_entropy"]["task0"] < 0.01
    header = (tmp_path / "train.csv").read_text().splitlines()[0].split(",")
    assert "gate_entropy_task1" in header and "gate_mean_task0_e1" in header
    with pytest.raises(ValueError, match="SharedBottom has no gates"):
        fit(models.build_model("shared-bottom", 6, 2, task_types=TASK_TYPES), x, y, steps=1, log_gates=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with pytest.raises(ValueError, match="log_gates with a DataLoader needs x_val"):
        fit(_model(), loader, log_gates=True)


def test_tensorboard_holds_every_number_of_every_record_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = _data(64)
    board, ckpt = tmp_path / "tb", tmp_path / "ck"
    common = dict(x_val=x[:32], y_val=y[:32], batch_size=16, progress=False, log=lambda _: None, tensorboard=board,
                  checkpoint_dir=ckpt, log_gates=True)
    fit(_model(), x, y, epochs=2, checkpoint_every=4, **common)  # 4 steps an epoch
    history = fit(_model(), x, y, epochs=3, resume=ckpt / "step-0000004.pt", **common)
    events = EventAccumulator(str(board))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train_loss_task0", "val_auc_task0", "val_mse_task1", "lr", "gate_entropy_task1",
            "gate_mean_task0_e2"} <= set(tags)
    for tag in ("train_loss_task1", "val_r2_task1", "gate_entropy_task0"):
        # the resumed run's epochs 2 and 3 replaced what the first run wrote after step 4
        seen = {e.step: e.value for e in events.Scalars(tag)}
        assert sorted(seen) == [4, 8, 12], tag
        key, _, task = tag.rpartition("_")
        for record in history:
            from mmoe_fast.train import _flatten

            assert seen[record["step"]] == pytest.approx(_flatten(record)[tag], rel=1e-6), (tag, record["epoch"])


def test_tensorboard_without_the_package_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    x, y = _data()
    with pytest.raises(ImportError, match="pip install tensorboard"):
        fit(_model(), x, y, steps=1, tensorboard=tmp_path, progress=False)


def test_a_float64_models_autograd_path_reports_its_losses_in_float64():
    x, y = _data()
    torch.manual_seed(0)
    model = models.MMoE(6, 2, num_experts=3, expert_hidden=4, task_types=TASK_TYPES, backend="reference").double()
    history = fit(model, x.double(), y, batch_size=60, steps=1, lr=1e-12, progress=False, log=lambda _: None)
    with torch.no_grad():  # the one batch is the whole data, and an update of 1e-12 moves the loss by less
        want = task_losses(model(x.double()), y.double(), model.task_types).tolist()
    assert history[-1]["train_loss"] == pytest.approx(want, rel=1e-10)  # float32 sums would be off by ~1e-8


def test_a_dataloader_of_dict_batches_trains_a_model_on_columns_like_the_dict_of_tensors():
    from mmoe_fast.features import Categorical, Dense, Multi

    columns = [Categorical("user", 10, 3), Multi("history", 10, 3, pooling="sum"), Dense("age")]
    g = torch.Generator().manual_seed(0)
    x = {"user": torch.randint(0, 10, (60,), generator=g), "history": torch.randint(-1, 10, (60, 4), generator=g),
         "age": torch.randn(60, generator=g)}
    _, y = _data()

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 60

        def __getitem__(self, i):
            return {k: v[i] for k, v in x.items()}, y[i]

    def build():
        torch.manual_seed(0)
        return models.MMoE(columns, 2, num_experts=3, expert_hidden=4, task_types=TASK_TYPES)

    a, b = build(), build()
    h1 = fit(a, x, y, epochs=2, batch_size=16, seed=3, **_quiet())
    h2 = fit(b, torch.utils.data.DataLoader(Rows(), batch_size=16, sampler=_FitOrder(60, seed=3)), epochs=2,
             **_quiet())
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    for r1, r2 in zip(h1, h2):
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-6)
