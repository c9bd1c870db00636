"""Data sets of the paper's experiments."""

from .census import CensusData, load_census
from .synthetic import make_synthetic

__all__ = ["CensusData", "load_census", "make_synthetic"]
