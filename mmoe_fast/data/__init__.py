"""Data sets of the paper's experiments, and the specs that name them."""

from .census import CensusData, load_census
from .splits import census_spec, load_splits, synthetic_spec
from .synthetic import make_synthetic

__all__ = ["CensusData", "census_spec", "load_census", "load_splits", "make_synthetic", "synthetic_spec"]
