"""DDP: two gloo ranks under torchrun train to the same parameters as one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmoe_fast import checkpoint, cli

# 45 rows per global batch: shards of 23 and 22 rows, then a last batch of 10 (5 and 5); 31 validation rows
# are gathered from uneven shards too. Adam's weight decay makes the step depend on the gradient's scale.
ARGS = ["train", "--n-train", "100", "--n-val", "31", "--batch-size", "45", "--epochs", "2", "--dim", "10",
        "--experts", "2", "--expert-hidden", "4", "--weight-decay", "0.5", "--lr", "0.01", "--no-progress",
        "--backend", "reference"]


def _outputs(folder):
    history = [json.loads(line) for line in (folder / "log" / "train.jsonl").read_text().splitlines()]
    return checkpoint.read(folder / "ckpt" / "model.pt")["state_dict"], history


@pytest.mark.parametrize("extra", [[], ["--loss-weighting", "uncertainty", "--clip-grad-norm", "0.5"],
                                   ["--loss-weighting", "gradnorm"]], ids=["static", "uncertainty-clipped", "gradnorm"])
def test_two_gloo_ranks_equal_one_process(tmp_path, capsys, extra):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    args = [*ARGS, *extra]
    io = ["--log-dir", "{}/log", "--checkpoint-dir", "{}/ckpt"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mmoe_fast",
         *args, *(a.format(ddp) for a in io)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP: 2 ranks (gloo), 45 rows per global batch" in proc.stdout
    assert proc.stdout.count("epoch   2") == 1  # only rank 0 prints
    assert cli.main([*args, *(a.format(single) for a in io)]) == 0
    assert "DDP" not in capsys.readouterr().out

    (ddp_params, ddp_history), (params, history) = _outputs(ddp), _outputs(single)
    for k, v in params.items():
        torch.testing.assert_close(ddp_params[k], v, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in ddp_history] == [r["step"] for r in history] == [3, 6]
    for a, b in zip(ddp_history, history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        for key, option in (("loss_log_variance", "uncertainty"), ("loss_task_weight", "gradnorm")):
            assert (key in a) == (key in b) == (option in extra)
            if key in a:  # the ranks' statistics are combined into the global batch's, as the model's gradients
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        for ma, mb in zip(a["val_metrics"], b["val_metrics"]):
            assert ma == pytest.approx(mb, rel=1e-5)


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_rank_ends_without_interpreter_teardown(world):
    """A torchrun rank leaves through os._exit, its output flushed: a gloo worker of the process group DDP keeps
    alive could otherwise be releasing tensors (it needs the GIL) while the interpreter finalizes, and abort."""
    code = ("import atexit, sys; atexit.register(lambda: print('finalized')); "
            "sys.argv = ['mmoe-fast', 'backends']; from mmoe_fast.cli import run; run()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORLD_SIZE": world})
    assert proc.returncode == 0, proc.stderr
    assert "cpp" in proc.stdout  # printed and flushed before the exit
    assert ("finalized" in proc.stdout) == (world == "1")
