"""Every bad invocation of every command: exit 2, exactly one line on stderr naming the option or file, no traceback.

The table is walked in-process through ``cli.main`` (a few cases as subprocesses). Files are made per case by
a small vocabulary of placeholders: ``{tmp}`` the case's folder, ``{file}`` a plain file, ``{truncated}`` half a
checkpoint, ``{foreign}`` a torch.save of a list, ``{text}`` a text file, ``{model}`` a model.pt without data,
``{sb}`` a Shared-Bottom checkpoint with data, ``{ckpt}`` a train checkpoint folder (2 experts, lr 0.01).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmoe_fast as mf
from mmoe_fast import cli, train

FIXTURE = str(Path(__file__).parent / "fixtures" / "census")
TINY = ["--n-train", "40", "--n-val", "10", "--d", "4", "--epochs", "1", "--batch-size", "20", "--no-progress"]
RUN = ["--experts", "2", "--expert-hidden", "3", "--lr", "0.01", "--backend", "reference"]
SYN = ["--n-train", "40", "--n-val", "10", "--d", "4", "--epochs", "1", "--no-progress"]

CASES = [
    # train: bad values
    (["train", "--lr", "nan"], "--lr"), (["train", "--lr", "0"], "--lr"), (["train", "--lr", "-1"], "--lr"),
    (["train", "--weight-decay", "-0.1"], "--weight-decay"), (["train", "--weight-decay", "inf"], "--weight-decay"),
    (["train", "--loss-weights", "1,nan"], "--loss-weights"), (["train", "--loss-weights", "1"], "loss_weights"),
    (["train", "--seed", "-1"], "--seed"), (["train", "--epochs", "0"], "--epochs"), (["train", "--d", "x"], "--d"),
    (["train", "--model", "nope"], "--model"), (["train", "--optimizer", "sgd"], "--optimizer"),
    (["train", "--correlation", "nan"], "--correlation"), (["train", "--backend", "nope"], "--backend"),
    (["train", "--bogus"], "--bogus"),
    (["train", "--checkpoint-every", "2", *TINY], "checkpoint_dir"),
    # train: outputs
    (["train", "--log-dir", "{file}", *TINY], "--log-dir {file}"),
    (["train", "--checkpoint-dir", "{file}", *TINY], "--checkpoint-dir {file}"),
    (["train", "--checkpoint-dir", "{file}/sub", *TINY], "--checkpoint-dir {file}/sub"),
    (["train", "--log-dir", "/proc/version/x", *TINY], "--log-dir /proc/version/x"),
    # train: resume from what is not a checkpoint of this run
    (["train", "--resume", "{tmp}/missing.pt", *TINY], "{tmp}/missing.pt"),
    (["train", "--resume", "{tmp}", *TINY], "{tmp}"),
    (["train", "--resume", "{truncated}", *TINY], "{truncated}"),
    (["train", "--resume", "{foreign}", *TINY], "{foreign}"),
    (["train", "--resume", "{text}", *TINY], "{text}"),
    (["train", "--resume", "{model}", *TINY], "{model}"),
    (["train", "--resume", "{ckpt}", *TINY, *RUN[:4], "--optimizer", "adamw", "--backend", "reference"],
     "--optimizer adam (checkpoint) vs adamw (now)"),
    (["train", "--resume", "{ckpt}", *TINY, "--experts", "4", *RUN[2:]], "--experts 2 (checkpoint) vs 4 (now)"),
    (["train", "--resume", "{ckpt}", *TINY, *RUN, "--correlation", "0.9"], "--correlation 0.5 (checkpoint) vs 0.9"),
    (["train", "--resume", "{ckpt}", *TINY, *RUN, "--seed", "3"], "--seed 0 (checkpoint) vs 3"),
    (["train", "--resume", "{ckpt}", *TINY[:-1], "--batch-size", "10", *RUN], "--batch-size 20 (checkpoint) vs 10"),
    (["train", "--resume", "{ckpt}", *TINY, *RUN, "--model", "omoe"], "--model mmoe (checkpoint) vs omoe"),
    # reproduce
    (["reproduce"], "experiment"), (["reproduce", "nope"], "nope"),
    (["reproduce", "correlation", "--p", "1.5"], "--p"), (["reproduce", "correlation", "--seeds", "0"], "--seeds"),
    (["reproduce", "correlation", "--models", "mmoe,esmm"], "--models"),
    (["reproduce", "correlation", "--lr", "nan"], "--lr"),
    (["reproduce", "correlation", *SYN, "--out", "{file}"], "--out {file}"),
    (["reproduce", "trainability", *SYN, "--out", "{file}/sub"], "--out {file}/sub"),
    (["reproduce", "trainability", "--data-seed", "-2"], "--data-seed"),
    (["reproduce", "census", "--runs", "0"], "--runs"), (["reproduce", "census", "--group", "3"], "--group"),
    (["reproduce", "census", "--census-path", "{tmp}/none", "--out", "{tmp}/o"], "{tmp}/none"),
    (["reproduce", "census", "--census-path", "{file}", "--out", "{tmp}/o"], "{file}"),
    (["reproduce", "census", "--census-path", "{badcensus}", "--out", "{tmp}/o", "--no-progress"],
     "census-income.data, line 2, column 1 (age)"),
    (["reproduce", "census", "--census-path", FIXTURE, "--out", "{file}"], "--out {file}"),
    # tune
    (["tune", "--lr", "nan"], "--lr"), (["tune", "--max-units", "0"], "--max-units"),
    (["tune", "--experts", "0"], "--experts"),
    (["tune", "--data", "synthetic", *SYN, "--max-units", "1", "--out", "{tmp}/o"], "--max-units"),
    (["tune", "--census-path", "{tmp}/none", "--out", "{tmp}/o"], "{tmp}/none"),
    (["tune", "--data", "synthetic", *SYN, "--out", "{file}"], "--out {file}"),
    # gates
    (["gates"], "checkpoint"), (["gates", "{tmp}"], "{tmp}"), (["gates", "{tmp}/missing.pt"], "{tmp}/missing.pt"),
    (["gates", "{truncated}"], "{truncated}"), (["gates", "{foreign}"], "{foreign}"), (["gates", "{text}"], "{text}"),
    (["gates", "{model}"], "{model}"), (["gates", "{sb}", "--out", "{tmp}/o"], "SharedBottom"),
    (["gates", "{ckpt}/model.pt", "--split", "test", "--out", "{tmp}/o"], "--split"),
    (["gates", "{ckpt}/model.pt", "--out", "{file}"], "--out {file}"),
    (["gates", "{ckpt}/model.pt", "--split", "nope"], "--split"),
    # bench, backends
    (["bench", "--shape", "1,2,3"], "--shape"), (["bench", "--dtype", "int8"], "--dtype"),
    (["bench", "--min-time", "x"], "--min-time"), (["backends", "--bogus"], "--bogus"), ([], "command"),
    (["nope"], "nope"),
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The files the placeholders name (one set, read-only use)."""
    root = tmp_path_factory.mktemp("made")
    paths = {"file": root / "a-file", "foreign": root / "foreign.pt", "text": root / "text.pt",
             "truncated": root / "truncated.pt", "model": root / "model.pt", "sb": root / "sb.pt",
             "ckpt": root / "ckpt", "badcensus": root / "census"}
    paths["file"].write_text("not a folder\n")
    torch.save([1, 2, 3], paths["foreign"])
    paths["text"].write_text("hello\n")
    mmoe = mf.build_model("mmoe", 4, 2, num_experts=2, expert_hidden=3)
    mf.save(mmoe, paths["model"])
    paths["truncated"].write_bytes(paths["model"].read_bytes()[:200])
    sb = mf.build_model("shared-bottom", 4, 2, task_types=("regression",) * 2)
    mf.save(sb, paths["sb"], data={"name": "synthetic", "correlation": 0.5, "d": 4, "n_train": 40, "n_val": 10,
                                   "seed": 0})
    assert cli.main(["train", *TINY, *RUN, "--checkpoint-dir", str(paths["ckpt"])]) == 0
    paths["badcensus"].mkdir()
    for name in ("census-income.data", "census-income.test"):
        lines = (Path(FIXTURE) / name).read_text().splitlines()
        lines[1] = "forty" + lines[1][lines[1].index(","):]
        (paths["badcensus"] / name).write_text("\n".join(lines) + "\n")
    return paths


def _fill(text: str, made: dict, tmp: Path) -> str:
    return text.format(tmp=tmp, **{k: str(v) for k, v in made.items()})


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, named", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_every_bad_invocation_exits_2_with_one_line_naming_it(argv, named, made, tmp_path, capsys, monkeypatch):
    argv = [_fill(a, made, tmp_path) for a in argv]
    named = _fill(named, made, tmp_path)
    # Bad outputs, bad resume and bad data are caught before any training; a case that trains is no error case.
    monkeypatch.setattr(train, "_backward", lambda *a, **k: pytest.fail("a training step ran"))
    code = _exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert named in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("argv, named", [
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--resume", "{truncated}", *TINY], "{truncated}"),
    (["gates", "{tmp}"], "{tmp}"),
    (["bench", "--shape", "1,2,x,4,5"], "--shape"),
])
def test_bad_invocations_as_a_process(argv, named, made, tmp_path):
    argv = [_fill(a, made, tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "mmoe_fast", *argv], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert _fill(named, made, tmp_path) in lines[0]


def test_resume_with_a_new_lr_applies_it_and_says_so(made, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert cli.main(["train", *TINY, *RUN, "--checkpoint-dir", str(ckpt)]) == 0
    capsys.readouterr()
    args = [*TINY, "--epochs", "2", *RUN[:4], "--backend", "reference", "--resume", str(ckpt)]
    assert cli.main(["train", *args, "--lr", "0.001", "--weight-decay", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "resume: lr 0.01 (checkpoint) -> 0.001, applied from step 2" in out
    assert "resume: weight_decay 0.0 (checkpoint) -> 0.01" in out
