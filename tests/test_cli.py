"""Smoke runs of the commands of the README, on tiny settings."""

import subprocess
import sys

import pytest

from mmoe_fast import cli
from mmoe_fast.models import MODELS


@pytest.mark.parametrize("model", sorted(set(MODELS) - {"esmm"}))
def test_train_runs_and_reports_losses_and_backend(model, capsys):
    rc = cli.main(["train", "--model", model, "--n-train", "300", "--n-val", "100", "--epochs", "2",
                   "--batch-size", "64", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "backend" in out and "epoch   2" in out and "task1=" in out


def test_train_refuses_a_model_that_cannot_fit_the_data(capsys):
    rc = cli.main(["train", "--model", "esmm", "--n-train", "50", "--n-val", "10", "--epochs", "1", "--no-progress"])
    assert rc == 2 and "--model esmm" in capsys.readouterr().err


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
