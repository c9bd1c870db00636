"""The ``mmoe-fast`` command: ``train``, ``predict``, ``bench``, ``backends``, and the experiments' ``reproduce``,
``tune`` and ``gates``."""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import torch

from . import backends, bench, checkpoint, distributed, experiments, files, models
from .argtypes import (
    OneLineParser,
    correlation,
    floats,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from .data import TableSchema, load_splits, read_table, synthetic_spec, table_spec
from .train import OPTIMIZERS, ResumeMismatch, fit, predict_proba

# The settings fit compares on resume, by the option of `train` that sets them.
_OPTION_OF = {"n_rows": "training rows (--n-train, or the table's)", "batch_size": "--batch-size", "seed": "--seed",
              "optimizer": "--optimizer", "loss_weights": "--loss-weights", "patience": "--patience",
              "model": "--model", "loss_weighting": "--loss-weighting", "clip_grad_norm": "--clip-grad-norm",
              "config.num_experts": "--experts", "config.expert_hidden": "--expert-hidden",
              "config.bottom_hidden": "--bottom-hidden", "config.in_features": "the input (--d, or --features)",
              "data.sha256": "--data (the file's contents)", "data.val_sha256": "--val-data (the file's contents)",
              "data.path": "--data", "data.val_path": "--val-data",
              "data.val_fraction": "--val-fraction", "data.schema": "--features",
              "data.correlation": "--correlation", "data.d": "--d", "data.n_train": "--n-train",
              "data.n_val": "--n-val", "data.seed": "--seed", "data.labels": "--labels"}


def _train(args: argparse.Namespace) -> int:
    device = distributed.init_from_env()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _train_on(args, device)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)
        distributed.shutdown()


def _train_on(args: argparse.Namespace, device: torch.device) -> int:
    say = print if distributed.is_main() else (lambda *_: None)
    if distributed.is_main():  # before any work: an unusable folder fails now, not after the training
        for option, where in (("--log-dir", args.log_dir), ("--checkpoint-dir", args.checkpoint_dir),
                              ("--tensorboard", args.tensorboard)):
            if where is not None:
                files.output_dir(where, option)
    torch.manual_seed(args.seed)
    spec, data = _data(args)
    task_types = data["task_types"]
    # Only the options the user gave: a model that has no use for one refuses it by name.
    chosen = {"num_experts": args.experts, "expert_hidden": args.expert_hidden, "bottom_hidden": args.bottom_hidden,
              "backend": None if args.backend == "auto" else args.backend}
    options = {key: value for key, value in chosen.items() if value is not None}
    schema = data.get("schema")
    inputs = args.d if schema is None else schema.columns()
    model = models.build_model(args.model, inputs, len(task_types), task_types=task_types, **options)
    model.to(device)
    setting = models.fused_backend(model)
    used = "none (no fused op in this model)" if setting is None else backends.backend_name(
        backends.resolve(setting, device, torch.float32))
    if schema is None:
        what = (f"synthetic data ({spec.get('labels', 'regression')} labels), correlation {args.correlation}, "
                f"{args.n_train} train / {args.n_val} validation rows")
    else:
        n_val = 0 if data["x_val"] is None else len(data["y_val"])
        what = (f"{args.data}: {len(data['y_train'])} train / {n_val} validation rows, {len(schema.features)} "
                "feature columns, labels " + ", ".join(f"{n} ({t})" for n, t in zip(schema.label_names, task_types)))
    say(f"model {args.model}: {models.count_parameters(model)} parameters; backend {used}; {what}")
    if distributed.world_size() > 1:
        say(f"DDP: {distributed.world_size()} ranks ({torch.distributed.get_backend()}), "
            f"{args.batch_size} rows per global batch")
    start = time.perf_counter()
    extra = {"data": spec} if schema is None else {"data": spec, "table": schema.to_dict()}
    fit(model, data["x_train"], data["y_train"], x_val=data["x_val"], y_val=data["y_val"], epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.no_progress, steps=args.steps,
        loss_weights=args.loss_weights, optimizer=args.optimizer, weight_decay=args.weight_decay,
        patience=args.patience, log_dir=args.log_dir, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume, checkpoint_extra=extra,
        loss_weighting=args.loss_weighting, clip_grad_norm=args.clip_grad_norm,
        label_mask=data.get("mask_train"), val_label_mask=data.get("mask_val"), log_gates=args.log_gates,
        tensorboard=args.tensorboard)
    say(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _predict(args: argparse.Namespace) -> int:
    """``predict CHECKPOINT --data FILE --out FILE.csv``: a table-trained model's predictions for new rows."""
    ckpt = checkpoint.read(args.checkpoint)
    if not isinstance(ckpt.get("table"), dict):
        raise checkpoint.CheckpointError(f"{args.checkpoint} holds no table schema: predict takes a model trained "
                                         "with train --data FILE --features SPEC")
    schema = TableSchema.from_spec(ckpt["table"])
    model = checkpoint.model_from(ckpt, args.checkpoint)
    frame = read_table(args.data)
    keep = [] if args.keep is None else [c for c in args.keep.split(",") if c]
    missing = [c for c in keep if c not in frame.columns]
    if missing:
        raise ValueError(f"--keep: {args.data} has no column {missing[0]!r}")
    clash = sorted(set(keep) & set(schema.label_names))
    if clash:
        raise ValueError(f"--keep: {clash[0]!r} is a label's name, which names a prediction column")
    files.output_dir(Path(args.out).parent, "--out")
    torch.set_num_threads(args.threads)
    out = predict_proba(model, schema.inputs(frame), args.batch_size)
    table = frame[keep].reset_index(drop=True).copy()
    for name, column in zip(schema.label_names, out.double().T.numpy()):
        table[name] = column
    files.write_text(args.out, table.to_csv(index=False))
    kinds = ", ".join(f"{n} ({'probability' if t == 'binary' else 'value'})"
                      for n, t in zip(schema.label_names, schema.task_types))
    print(f"{len(table)} rows predicted by {args.checkpoint}: {kinds} -> {args.out}")
    return 0


# The options of the synthetic data, with their defaults (None in the parser: given or not is told apart).
_SYNTHETIC = {"correlation": 0.5, "labels": None, "n_train": 10000, "n_val": 2000, "d": 100}
_TABLE = {"features": None, "val_data": None, "val_fraction": 0.1}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _data(args: argparse.Namespace) -> tuple[dict, dict]:
    """The data spec of ``args`` and its splits: the synthetic data, or a user's table."""
    if args.data == "synthetic":
        given = [_flag(k) for k in _TABLE if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} are for a table (--data FILE), not the synthetic data")
        for key, default in _SYNTHETIC.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
        labels = args.labels or ("click_conversion" if args.model == "esmm" else "regression")
        spec = synthetic_spec(correlation=args.correlation, d=args.d, n_train=args.n_train, n_val=args.n_val,
                              seed=args.seed, labels=labels)
        return spec, load_splits(spec)
    given = [_flag(k) for k in _SYNTHETIC if getattr(args, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} are for the synthetic data, not a table (--data {args.data})")
    if args.features is None:
        raise ValueError(f"--data {args.data} needs --features SPEC.json: what each column is (see README)")
    if args.val_data is not None and args.val_fraction is not None:
        raise ValueError("give --val-data or --val-fraction, not both")
    schema = TableSchema.from_spec(args.features)
    spec = table_spec(path=Path(args.data).resolve(), schema=schema.to_dict(),
                      val_path=None if args.val_data is None else Path(args.val_data).resolve(),
                      val_fraction=0.1 if args.val_fraction is None else args.val_fraction, seed=args.seed)
    spec["sha256"] = files.sha256(args.data)  # a resume on a changed file is refused, naming it
    if args.val_data is not None:
        spec["val_sha256"] = files.sha256(args.val_data)
    return spec, load_splits(spec)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mmoe-fast", description="Fused MMoE: train, benchmark, inspect backends.")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a multi-task model on the paper's synthetic data or on your own table "
                        "(under torchrun: DDP, gloo on CPU, nccl on CUDA)")
    tr.add_argument("--data", default="synthetic",
                    help="synthetic (the paper's data), or a .csv/.tsv/.parquet file with --features")
    tr.add_argument("--features", default=None, help="with --data FILE: a JSON file naming the feature and "
                    "label columns (mmoe_fast.data.TableSchema)")
    tr.add_argument("--val-data", default=None, help="with --data FILE: the validation rows' file")
    tr.add_argument("--val-fraction", type=fraction, default=None,
                    help="with --data FILE: a seeded fraction of its rows held out for validation (default 0.1)")
    tr.add_argument("--correlation", type=correlation, default=None,
                    help="synthetic: task correlation p in [-1, 1] (default 0.5)")
    tr.add_argument("--labels", choices=["regression", "binary", "click_conversion"], default=None,
                    help="synthetic targets: the paper's regression (default), each above its median as binary, "
                    "or ESMM's click and click-then-conversion (the default for --model esmm)")
    tr.add_argument("--model", choices=sorted(models.MODELS), default="mmoe")
    tr.add_argument("--backend", default="auto", choices=["auto", *backends.BACKENDS])
    tr.add_argument("--n-train", type=positive_int, default=None, help="synthetic: training rows (default 10000)")
    tr.add_argument("--n-val", type=positive_int, default=None, help="synthetic: validation rows (default 2000)")
    # --dim too: torchrun rejects "--d" as an ambiguous abbreviation of its own options.
    tr.add_argument("--d", "--dim", dest="d", type=positive_int, default=None,
                    help="synthetic: input dimension (default 100)")
    tr.add_argument("--experts", type=positive_int, default=None, help="MMoE/OMoE experts (model default: 8)")
    tr.add_argument("--expert-hidden", type=positive_int, default=None,
                    help="MMoE/OMoE/CGC/PLE units per expert (model default: 16)")
    tr.add_argument("--bottom-hidden", type=positive_int, default=None,
                    help="Shared-Bottom/ESMM bottom width (model default: 113, size-matched to MMoE)")
    tr.add_argument("--epochs", type=positive_int, default=10)
    tr.add_argument("--steps", type=positive_int, default=None,
                    help="train this many optimizer steps instead of epochs")
    tr.add_argument("--batch-size", type=positive_int, default=128)
    tr.add_argument("--lr", type=positive_float, default=1e-3)
    tr.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    tr.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    tr.add_argument("--loss-weights", type=floats, default=None, help="per-task loss weights, e.g. 1,0.5")
    tr.add_argument("--loss-weighting", choices=["static", "uncertainty", "gradnorm"], default="static",
                    help="static: --loss-weights; uncertainty: learned per-task log variances (Kendall et al. 2018); "
                         "gradnorm: task weights that balance the tasks' gradient norms (Chen et al. 2018, alpha 1.5)")
    tr.add_argument("--clip-grad-norm", type=positive_float, default=None,
                    help="clip the gradients' global L2 norm to this before each update")
    tr.add_argument("--patience", type=positive_int, default=None,
                    help="early stopping: epochs without a better task-0 validation metric")
    tr.add_argument("--log-dir", default=None, help="write train.jsonl and train.csv here")
    tr.add_argument("--tensorboard", default=None, help="write TensorBoard event files here (needs tensorboard)")
    tr.add_argument("--log-gates", action="store_true",
                    help="every epoch, each gate's mean weight per expert and entropy, and collapse warnings "
                         "(MMoE, OMoE, CGC, PLE)")
    tr.add_argument("--checkpoint-dir", default=None, help="write step-*.pt checkpoints and model.pt here")
    tr.add_argument("--checkpoint-every", type=positive_int, default=None, help="checkpoint every this many steps")
    tr.add_argument("--resume", default=None, help="a checkpoint file, or a directory (its latest checkpoint)")
    tr.add_argument("--seed", type=non_negative_int, default=0)
    # One thread by default: the paper-sized model's ops are too small to gain from more, and on shared cores
    # a second intra-op thread stalls every op (benchmarks/bench_train_threads.py).
    tr.add_argument("--threads", type=positive_int, default=1, help="intra-op CPU threads per process")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train)

    be = sub.add_parser("bench", help="time every backend against the references", add_help=False)
    be.set_defaults(func=None)

    pr = sub.add_parser("predict", help="predictions of a model trained on a table (train --data FILE) for a "
                        "table's rows, as CSV: a probability per binary task, a value per regression task")
    pr.add_argument("checkpoint", help="the model.pt (or step-*.pt) that train wrote")
    pr.add_argument("--data", required=True, help="a .csv/.tsv/.parquet file with the model's feature columns")
    pr.add_argument("--out", required=True, help="the CSV to write: the --keep columns, then one per task")
    pr.add_argument("--keep", default=None, help="input columns to copy into the output, e.g. user_id,item_id")
    pr.add_argument("--batch-size", type=positive_int, default=4096)
    pr.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    pr.set_defaults(func=_predict)

    bk = sub.add_parser("backends", help="list backends, why one cannot run, and what auto picks")
    bk.set_defaults(func=lambda args: print(backends.describe()) or 0)
    experiments.add_commands(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ResumeMismatch):
        return exc.render(lambda key: _OPTION_OF.get(key, key))
    text = " ".join(str(exc).split())  # one line: a library's message may span several
    return text or type(exc).__name__


def _bench(argv: list[str]) -> int:
    """``bench.main``, its argparse usage error cut to its one error line (bench builds its own parser)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return bench.main(argv)
    except SystemExit as exc:
        lines = err.getvalue().strip().splitlines()
        if exc.code == 2 and lines:
            err = io.StringIO(lines[-1] + "\n")
        raise
    finally:
        sys.stderr.write(err.getvalue())


def main(argv: list[str] | None = None) -> int:
    """Run the ``mmoe-fast`` command ``argv``; bad input is exit 2 with one line on stderr, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "mmoe-fast"
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        args = build_parser().parse_args(argv)
        command = args.command
        return args.func(args)
    # Bad input, an unusable file or folder (OSError names it), a diverged run: a message, not a traceback.
    except (ValueError, OSError, FloatingPointError, ImportError) as exc:
        print(f"mmoe-fast {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def run() -> None:
    """The console entry point: ``sys.exit(main())``; a torchrun rank ends through
    :func:`distributed.exit_rank`, which a gloo process group needs to exit cleanly."""
    code = main()
    if distributed.launched():
        distributed.exit_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
