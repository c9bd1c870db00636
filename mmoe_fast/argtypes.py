"""argparse types shared by the commands: a bad value is a usage error (exit 2) naming the option."""

from __future__ import annotations

import argparse
import math


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage error is one line on stderr (exit 2) naming the option, not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(text: str, what: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int(text, "a positive integer", 1)


def non_negative_int(text: str) -> int:
    return _int(text, "a non-negative integer", 0)


def _finite(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):  # float() takes "nan" and "inf": no option wants them
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    return _finite(text, "a finite number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a weight decay)."""
    return _finite(text, "a finite number >= 0", lambda v: v >= 0)


def fraction(text: str) -> float:
    """A number in [0, 1) (a share of rows held out)."""
    return _finite(text, "a number in [0, 1)", lambda v: 0 <= v < 1)


def correlation(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}")
    return value


def floats(text: str) -> list[float]:
    """Comma-separated finite numbers >= 0 (loss weights)."""
    try:
        return [non_negative_float(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers >= 0, got {text!r}") from None


def list_of(cast, choices=None):
    """A comma-separated list of ``cast`` values (each in ``choices`` when given)."""
    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list from {list(choices or [])}, got {text!r}"
                                             if bad else f"expected a comma-separated list, got {text!r}")
        return values
    return parse
