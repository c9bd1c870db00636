"""No silent wrong answer, no lost work: bad labels refused, every update checked, resume exact or refused,
outputs checked before the work and written atomically, census values checked, forked numba a clear error."""

import errno
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import checkpoint, files, forksafe, train
from mmoe_fast.data import load_census
from mmoe_fast.experiments import common
from mmoe_fast.models import MMoE
from mmoe_fast.train import ResumeMismatch, fit

TASK_TYPES = ("binary", "regression")
CENSUS = Path(__file__).parent / "fixtures" / "census"


def _data(n=60, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    label = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).float()
    return x, torch.stack([label, x[:, 1] - x[:, 2]], dim=1)


def _model(cls=MMoE, experts=3, **kw):
    torch.manual_seed(0)
    return cls(6, 2, num_experts=experts, expert_hidden=4, tower_hidden=(3,), task_types=TASK_TYPES,
               backend="reference", **kw)


class DivergeAt(MMoE):
    """Its ``extra_loss`` is 0 (finite) but has a NaN gradient at call ``at``: that update alone diverges."""

    at = 0

    def extra_loss(self):
        self.calls = getattr(self, "calls", 0) + 1
        w = self.towers.towers[0][0].weight
        return torch.sqrt(w.sum() * 0) if self.calls == self.at else w.sum() * 0


def _all_finite(path: Path) -> bool:
    ckpt = torch.load(path, weights_only=True)

    def walk(v):
        if isinstance(v, torch.Tensor):
            return not v.is_floating_point() or bool(torch.isfinite(v).all())
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ()
        return all(walk(i) for i in items)
    return walk(ckpt)


QUIET = dict(progress=False, log=lambda _: None)


# Labels and features ------------------------------------------------------------------------------------

@pytest.mark.parametrize("column, value, match", [
    (0, -1.0, "exactly 0 or 1"), (0, 0.5, "exactly 0 or 1"), (0, 2.0, "exactly 0 or 1"), (0, float("nan"), "NaN"),
    (1, float("nan"), "NaN"), (1, float("inf"), "must be finite"),
])
@pytest.mark.parametrize("where", ["y", "y_val"])
def test_unusable_targets_are_refused_naming_task_and_row(column, value, match, where):
    x, y = _data()
    bad = y.clone()
    bad[7, column] = value
    args = dict(y=bad) if where == "y" else dict(y=y, x_val=x, y_val=bad)
    with pytest.raises(ValueError, match=f"{where}: task{column} .*{match}.* row 7"):
        fit(_model(), x, args.pop("y"), epochs=1, **args, **QUIET)


def test_labels_in_minus_one_one_are_refused_by_the_metrics_too():
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        train.task_metrics(torch.randn(4, 2), torch.tensor([[-1.0, 0], [1, 0], [-1, 0], [1, 0]]), TASK_TYPES)


def test_non_finite_features_are_refused_naming_row_and_column():
    x, y = _data()
    x[4, 2] = float("nan")
    with pytest.raises(ValueError, match="x has a non-finite value nan at row 4, column 2"):
        fit(_model(), x, y, epochs=1, **QUIET)


def test_early_stopping_on_an_undefined_auc_is_refused_up_front():
    x, y = _data()
    y_val = y[40:].clone()
    y_val[:, 0] = 1.0
    with pytest.raises(ValueError, match="one class, so the AUC is undefined"):
        fit(_model(), x[:40], y[:40], x_val=x[40:], y_val=y_val, patience=2, **QUIET)


def test_an_undefined_auc_is_reported_as_such():
    x, y = _data()
    y_val = y[40:].clone()
    y_val[:, 0] = 0.0
    lines = []
    history = fit(_model(), x[:40], y[:40], x_val=x[40:], y_val=y_val, epochs=2, progress=False, log=lines.append)
    assert all(r["val_metrics"][0]["auc"] != r["val_metrics"][0]["auc"] for r in history)  # NaN, not a number
    assert sum("auc=nan (one class in validation)" in line for line in lines) == 2


# Every update checked; no checkpoint ever non-finite ----------------------------------------------------

@pytest.mark.parametrize("at, every", [(1, 1), (3, 2), (5, 1), (5, None)])
def test_a_diverging_update_raises_and_no_checkpoint_is_ever_non_finite(tmp_path, at, every):
    x, y = _data()
    model = _model(DivergeAt)
    model.at = at
    with pytest.raises(FloatingPointError, match=rf"diverged at epoch \d+, step {at}: the update made"):
        fit(model, x, y, steps=5, batch_size=12, checkpoint_dir=tmp_path, checkpoint_every=every, **QUIET)
    written = sorted(p.name for p in tmp_path.iterdir())
    expected = [f"step-{s:07d}.pt" for s in range(1, at) if every is not None and s % every == 0]
    assert written == expected  # the good ones stay; no model.pt, no step of the diverged update
    assert all(_all_finite(tmp_path / name) for name in written)


def test_the_divergence_message_names_the_last_good_checkpoint(tmp_path):
    x, y = _data()
    model = _model(DivergeAt)
    model.at = 5
    with pytest.raises(FloatingPointError, match="step-0000004.pt, is kept"):
        fit(model, x, y, steps=5, batch_size=12, checkpoint_dir=tmp_path, checkpoint_every=2, **QUIET)


def test_save_refuses_non_finite_tensors_and_keeps_the_previous_file(tmp_path):
    model = _model()
    mf.save(model, tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()
    bad = next(iter(model.parameters()))
    with torch.no_grad():
        bad.view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match="holds NaN or infinite"):
        mf.save(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"\['note'\]\[1\]"):
        mf.save(_model(), tmp_path / "m.pt", extra={"note": [torch.ones(1), torch.tensor([float("nan")])]})
    assert (tmp_path / "m.pt").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


# Resume: exact or refused -----------------------------------------------------------------------------

def _first(tmp_path, **kw):
    x, y = _data()
    fit(_model(), x[:48], y[:48], steps=4, batch_size=10, lr=0.02, checkpoint_dir=tmp_path / "ckpt", **QUIET, **kw)
    return x, y


@pytest.mark.parametrize("change, key", [
    (dict(optimizer="adamw"), "optimizer adam (checkpoint) vs adamw"),
    (dict(loss_weights=[1.0, 0.5]), r"loss_weights \[1.0, 1.0\] \(checkpoint\) vs \[1.0, 0.5\]"),
    (dict(main_task=1), "main_task 0 (checkpoint) vs 1"),
    (dict(seed=5), "seed 0 (checkpoint) vs 5"),
    (dict(batch_size=12), "batch_size 10 (checkpoint) vs 12"),
    (dict(rows=40), "n_rows 48 (checkpoint) vs 40"),
    (dict(experts=4), "config.num_experts 3 (checkpoint) vs 4"),
    (dict(checkpoint_extra={"data": {"name": "other"}}), "data None (checkpoint)"),
])
def test_resume_refuses_settings_that_change_what_is_trained(tmp_path, change, key):
    x, y = _first(tmp_path)
    change = dict(change)
    rows, experts = change.pop("rows", 48), change.pop("experts", 3)
    kw = dict(steps=8, batch_size=10, lr=0.02) | change
    with pytest.raises(ResumeMismatch, match=key.replace("(", r"\(").replace(")", r"\)") if "\\" not in key else key):
        fit(_model(experts=experts), x[:rows], y[:rows], resume=tmp_path / "ckpt", **kw, **QUIET)


def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path):
    x, y = _first(tmp_path)
    lines = []
    same = _model()
    fit(same, x[:48], y[:48], steps=8, batch_size=10, lr=0.02, resume=tmp_path / "ckpt", progress=False,
        log=lambda _: None)
    model = _model()
    fit(model, x[:48], y[:48], steps=8, batch_size=10, lr=0.001, weight_decay=0.1, resume=tmp_path / "ckpt",
        progress=False, log=lines.append)
    assert any("lr 0.02 (checkpoint) -> 0.001, applied from step 4" in line for line in lines)
    assert any("weight_decay 0.0 (checkpoint) -> 0.1" in line for line in lines)
    assert not torch.equal(model.towers.towers[0][0].weight, same.towers.towers[0][0].weight)


def test_resume_from_a_damaged_trainer_entry_is_a_checkpoint_error(tmp_path):
    _first(tmp_path)
    path = tmp_path / "ckpt" / "step-0000004.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["trainer"]["generator"]
    torch.save(ckpt, path)
    x, y = _data()
    with pytest.raises(checkpoint.CheckpointError, match="trainer state"):
        fit(_model(), x[:48], y[:48], steps=8, batch_size=10, lr=0.02, resume=path, **QUIET)


def test_resume_past_the_run_length_is_refused(tmp_path):
    x, y = _first(tmp_path)
    with pytest.raises(ValueError, match="past this run's 2 steps"):
        fit(_model(), x[:48], y[:48], steps=2, batch_size=10, lr=0.02, resume=tmp_path / "ckpt", **QUIET)


# Outputs: checked before the first step, written atomically --------------------------------------------

def _no_training(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a training step ran before the output folders were checked")
    monkeypatch.setattr(train, "_backward", refuse)


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text("x") and p, "is a file, not a folder"),
    (lambda p: (p.write_text("x"), p / "sub")[1], "is a file"),
])
@pytest.mark.parametrize("option", ["log_dir", "checkpoint_dir"])
def test_an_unusable_output_folder_fails_before_the_first_step(tmp_path, monkeypatch, make, match, option):
    where = make(tmp_path / "f")
    _no_training(monkeypatch)
    x, y = _data()
    with pytest.raises(files.OutputError, match=f"{option} {where} .*{match}"):
        fit(_model(), x, y, epochs=1, **{option: where}, **QUIET)


def test_a_read_only_output_folder_fails_before_the_first_step(tmp_path, monkeypatch):
    def read_only(*_a, **_k):
        raise PermissionError(errno.EROFS, "Read-only file system")
    _no_training(monkeypatch)
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    x, y = _data()
    with pytest.raises(files.OutputError, match="checkpoint_dir .* is not writable: Read-only file system"):
        fit(_model(), x, y, epochs=1, checkpoint_dir=tmp_path / "ro", **QUIET)


def _disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("producer", ["logs", "checkpoint", "results"])
def test_a_failed_write_keeps_the_previous_files_whole(tmp_path, monkeypatch, producer):
    x, y = _data()
    if producer == "logs":
        def write():
            fit(_model(), x[:48], y[:48], x_val=x[48:], y_val=y[48:], epochs=2, batch_size=10, log_dir=tmp_path,
                **QUIET)
    elif producer == "checkpoint":
        def write():
            mf.save(_model(), tmp_path / "model.pt", data={"name": "synthetic"})
    else:
        def write():
            common.write_outputs(tmp_path, {"a": 1.0}, "| t |\n", lambda plt: plt.figure())
    write()
    before = _snapshot(tmp_path)
    assert before and all(before.values())
    monkeypatch.setattr(os, "replace", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        write()
    assert _snapshot(tmp_path) == before  # nothing partial, nothing lost, no temporary file left


def test_write_atomic_failing_mid_file_leaves_the_old_content(tmp_path):
    (tmp_path / "a.txt").write_text("good\n")

    def half(f):
        f.write("partial")
        _disk_full()
    with pytest.raises(OSError):
        files.write_atomic(tmp_path / "a.txt", half)
    assert _snapshot(tmp_path) == {"a.txt": b"good\n"}


# Census values --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("column, token, match", [
    (0, " x7", r"column 1 \(age\): 'x7' is not a finite number"),
    (0, " nan", r"column 1 \(age\): 'nan' is not a finite number"),
    (5, " ?", r"column 6 \(wage_per_hour\): '\?' is not a finite number"),
    (39, " inf", r"column 40 \(weeks_worked_in_year\)"),
    (41, " 50000-.", r"column 42 \(income\): '50000-.' is not one of its known values"),
    (7, " Never-married", r"column 8 \(marital_status\)"),
    (4, " Bachelor", r"column 5 \(education\)"),
])
@pytest.mark.parametrize("file", ["census-income.data", "census-income.test"])
def test_census_values_that_cannot_be_read_name_file_line_and_column(tmp_path, column, token, match, file):
    for name in ("census-income.data", "census-income.test"):
        shutil.copy(CENSUS / name, tmp_path / name)
    lines = (tmp_path / file).read_text().splitlines()
    lines.insert(0, "")  # a blank line counts: the message gives the file's own line numbers
    row = lines[2].split(",")
    row[column] = token
    lines[2] = ",".join(row)
    (tmp_path / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{tmp_path / file}, line 3, {match}"):
        load_census(1, path=tmp_path)


def test_census_question_mark_is_a_category_of_its_own():
    data = load_census(1, path=CENSUS)
    assert any(name.endswith("=?") for name in data.feature_names)
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_val).all()


# Forked children of a process running numba's OpenMP pool ---------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_fork_of_a_numba_openmp_process_gets_a_clear_error():
    pytest.importorskip("numba")
    from mmoe_fast import ops

    x = torch.randn(8, 4)
    ops.gate_softmax(x, torch.randn(2, 4, 3), None, backend="numba")  # starts numba's pool
    if not forksafe._numba_openmp_running():
        pytest.skip("numba does not run on GNU OpenMP here")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the message through the pipe, never run pytest's teardown
        try:
            ops.gate_softmax(x, torch.randn(2, 4, 3), None, backend="numba")
            os.write(write, b"no error")
        except RuntimeError as exc:
            os.write(write, str(exc).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    message = os.read(read, 4096).decode()
    os.close(read)
    assert "cannot run in this forked process" in message and "'spawn'" in message
    forksafe.check_numba()  # the parent itself is unaffected


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_fork_of_a_process_that_ran_the_cpp_kernels_runs_them_on_one_thread():
    """GNU OpenMP's threads do not survive fork(): without the one-thread rule the child would hang."""
    from mmoe_fast import ops
    from mmoe_fast.backends import cpp

    if cpp.unavailable_reason() is not None:
        pytest.skip("mmoe_fast._C not built")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w, b = torch.randn(512, 64), torch.randn(8, 64, 128), torch.randn(8, 128)
        wg, bg = torch.randn(2, 64, 8), torch.randn(2, 8)
        want = ops.mmoe(x, w, b, wg, bg, backend="cpp")  # the parent's OpenMP threads start here
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            ok = torch.equal(ops.mmoe(x, w, b, wg, bg, backend="cpp"), want) and torch.get_num_threads() == 1
            os.write(write, b"ok" if ok else b"wrong")
            os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 60
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                pytest.fail("the forked child hung in an OpenMP region")
            time.sleep(0.05)
        assert os.read(read, 16) == b"ok"
        os.close(read)
    finally:
        torch.set_num_threads(threads)
