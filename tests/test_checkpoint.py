"""The checkpoint format: every registered model comes back from its file alone, and a bad file is one clear error."""

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import checkpoint
from mmoe_fast.models import MODELS

# Options away from the defaults, so a rebuild that ignored the recorded config would not match.
NON_DEFAULT = {
    "mmoe": dict(num_experts=3, expert_hidden=(5, 4), tower_hidden=(3,), gate_bias=False, activation="gelu"),
    "omoe": dict(num_experts=2, expert_hidden=6, tower_hidden=()),
    "shared-bottom": dict(bottom_hidden=(9, 5), tower_hidden=(4,)),
    "single-task": dict(task_hidden=(6, 3)),
    "l2-constrained": dict(task_hidden=5, alpha=0.5),
    "cross-stitch": dict(task_hidden=(4, 4)),
    "tensor-factorization": dict(task_hidden=6, ranks=(1, 3, 2)),
    "esmm": dict(bottom_hidden=7),
    "cgc": dict(num_specific_experts=1, num_shared_experts=3, expert_hidden=4, mixture="per-group"),
    "ple": dict(num_levels=3, num_specific_experts=2, num_shared_experts=1, expert_hidden=(5, 3)),
}


def test_every_model_has_a_non_default_row():
    assert set(NON_DEFAULT) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_load_of_save_gives_the_same_model(name, tmp_path):
    torch.manual_seed(0)
    task_types = ("binary", "binary") if name == "esmm" else ("binary", "regression")
    model = mf.build_model(name, 7, 2, task_types=task_types, **NON_DEFAULT[name]).eval()
    torch.manual_seed(1)  # the rebuilt model initializes differently: only the file can make it equal
    loaded = mf.load(mf.save(model, tmp_path / "m.pt"))
    assert type(loaded) is type(model) and loaded.config() == model.config()
    assert loaded.task_types == task_types and not loaded.training
    x = torch.randn(5, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_extra_entries_come_back_and_must_be_plain(tmp_path):
    model = mf.MMoE(4, 2, num_experts=2, expert_hidden=3)
    mf.save(model, tmp_path / "m.pt", data={"name": "synthetic", "seed": 3}, note=("a", 1, None, 2.5))
    ckpt = checkpoint.read(tmp_path / "m.pt")
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["model"] == "mmoe"
    assert ckpt["data"] == {"name": "synthetic", "seed": 3} and ckpt["note"] == ("a", 1, None, 2.5)
    with pytest.raises(TypeError, match="note"):
        mf.save(model, tmp_path / "bad.pt", note=object())
    with pytest.raises(ValueError, match="reserved"):
        mf.save(model, tmp_path / "bad.pt", state_dict={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def _one_line_error(path, match):
    with pytest.raises(checkpoint.CheckpointError, match=match) as exc:
        mf.load(path)
    message = str(exc.value)
    assert isinstance(exc.value, ValueError) and str(path) in message and "\n" not in message
    return message


def test_a_missing_file_is_one_clear_error(tmp_path):
    _one_line_error(tmp_path / "nope.pt", "no such checkpoint file")
    _one_line_error(tmp_path, "not a file")


def test_a_truncated_file_is_one_clear_error(tmp_path):
    path = mf.save(mf.MMoE(4, 2), tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(path, "cannot be read as a checkpoint")


@pytest.mark.parametrize("content,match", [
    ({"model": {"w": torch.zeros(2)}}, "not an mmoe_fast checkpoint"),  # a plain torch.save
    ({"w": torch.zeros(2)}, "not an mmoe_fast checkpoint"),
    ([1, 2], "not an mmoe_fast checkpoint"),
    ({"format": 1, "model": {}}, "format 1"),  # the trainer's old format
    ({"format": checkpoint.FORMAT, "model": "mmoe"}, "incomplete checkpoint: no class, config, state_dict"),
])
def test_a_foreign_torch_file_is_one_clear_error(tmp_path, content, match):
    torch.save(content, tmp_path / "f.pt")
    _one_line_error(tmp_path / "f.pt", match)


def test_a_file_that_is_not_torch_or_holds_objects_is_one_clear_error(tmp_path):
    (tmp_path / "t.pt").write_text("model weights\n")
    _one_line_error(tmp_path / "t.pt", "cannot be read as a checkpoint")
    torch.save({"format": checkpoint.FORMAT, "thing": object()}, tmp_path / "o.pt")  # weights_only refuses it
    _one_line_error(tmp_path / "o.pt", "cannot be read as a checkpoint")


def test_an_unregistered_class_is_saved_but_not_rebuilt(tmp_path):
    class Wider(mf.MMoE):
        pass

    model = Wider(4, 2)
    ckpt = checkpoint.read(mf.save(model, tmp_path / "w.pt"))
    assert ckpt["model"] is None and ckpt["class"].endswith("Wider") and ckpt["config"] == model.config()
    _one_line_error(tmp_path / "w.pt", "not a model of MODELS")
    other = mf.MMoE(4, 2)
    other.load_state_dict(ckpt["state_dict"])  # what the message says to do
