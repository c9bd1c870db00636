"""Data sets of the paper's experiments, and the specs that name them."""

from .census import CensusData, load_census
from .splits import census_spec, load_splits, synthetic_spec, table_spec
from .synthetic import make_synthetic
from .table import TableSchema, read_table

__all__ = ["CensusData", "TableSchema", "census_spec", "load_census", "load_splits", "make_synthetic", "read_table",
           "synthetic_spec", "table_spec"]
