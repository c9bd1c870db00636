"""Smoke runs of the commands of the README, on tiny settings."""

import subprocess
import sys

import pytest
import torch

from mmoe_fast import backends, cli
from mmoe_fast import models as mf_models
from mmoe_fast.models import MODELS


@pytest.mark.parametrize("model", sorted(set(MODELS) - {"esmm"}))
def test_train_runs_and_reports_losses_and_backend(model, capsys):
    rc = cli.main(["train", "--model", model, "--n-train", "300", "--n-val", "100", "--epochs", "2",
                   "--batch-size", "64", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    fused = mf_models.fused_backend(mf_models.build_model(model, 4, 2, task_types=("regression",) * 2))
    expected = "none" if fused is None else backends.backend_name(backends.resolve("auto", torch.device("cpu"),
                                                                                  torch.float32))
    assert f"backend {expected}" in out and "epoch   2" in out and "task1=" in out


def test_train_refuses_a_model_that_cannot_fit_the_data(capsys):
    rc = cli.main(["train", "--model", "esmm", "--labels", "regression", "--n-train", "50", "--n-val", "10",
                   "--epochs", "1", "--no-progress"])
    assert rc == 2 and "ESMM" in capsys.readouterr().err


def test_bench_prints_every_row(capsys):
    assert cli.main(["bench", "--shape", "3,5,2,4,2", "--min-time", "0.01"]) == 0
    out = capsys.readouterr().out
    for row in ("gemm floor", "loop reference", "batched reference"):
        assert row in out


def test_backends_command(capsys):
    assert cli.main(["backends"]) == 0
    assert "auto on cpu float32" in capsys.readouterr().out


def test_module_entry_point_and_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "mmoe_fast", "train", "--model", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--model" in proc.stderr


TINY = ["--n-train", "50", "--n-val", "10", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize("argv,named", [
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--n-val", "0"], "--n-val"),
    (["train", "--batch-size", "-4"], "--batch-size"),
    (["train", "--correlation", "2"], "--correlation"),
    (["train", "--threads", "0"], "--threads"),
    (["reproduce", "correlation", "--seeds", "0"], "--seeds"),
    (["reproduce", "correlation", "--p", "1.5"], "--p"),
    (["reproduce", "correlation", "--models", "mmoe,esmm"], "--models"),
    (["reproduce", "census", "--runs", "0"], "--runs"),
    (["bench", "--shape", "1,2,3"], "--shape"),
])
def test_bad_arguments_are_usage_errors_naming_the_option(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("argv,named", [
    (["train", "--model", "cgc", "--experts", "3", *TINY], "num_experts"),
    (["train", "--model", "shared-bottom", "--backend", "cpp", *TINY], "backend"),
    (["train", "--resume", "/nonexistent/ckpt", *TINY], "/nonexistent/ckpt"),
    (["train", "--checkpoint-every", "2", *TINY], "checkpoint_dir"),
    (["gates", "/nonexistent/model.pt"], "/nonexistent/model.pt"),
])
def test_bad_input_is_a_message_not_a_traceback(argv, named, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
