"""Data sets of the paper's experiments."""

from .synthetic import make_synthetic

__all__ = ["make_synthetic"]
