"""The paper's experiments as commands: ``reproduce correlation|trainability|labels|shared-bottom|census``,
``tune`` and ``gates``.

Every command writes ``result.json``, ``table.md`` and ``plot.png`` to ``--out`` (default
``results/<command>``; ``reproduce census``: ``results/census-group<N>``) and prints the table. Defaults finish
in minutes on 2 CPU cores; ``--full`` runs at a scale closer to the paper's. The models they save are
:mod:`mmoe_fast.checkpoint` files with a ``data`` entry (the ``load_splits`` spec), so ``gates`` rebuilds both
the model and its data.

One file per job: ``common`` (a run, the outputs), ``synthetic`` (Figures 2-5), ``census`` (Tables 1
and 2), ``tune``, ``gates``, and ``commands`` (the argparse side).
"""

from .census import DEFAULT_CENSUS_MODELS, PAPER_CENSUS_MAIN_AUC
from .commands import add_commands
from .common import main_score, train_run
from .gates import gate_tables, mean_gate_weights
from .synthetic import DEFAULT_SYNTHETIC_MODELS

__all__ = ["DEFAULT_CENSUS_MODELS", "DEFAULT_SYNTHETIC_MODELS", "PAPER_CENSUS_MAIN_AUC", "add_commands", "main_score",
           "gate_tables", "mean_gate_weights", "train_run"]
