"""Output files that are never partial: folders checked before the work, writes atomic.

A command checks every output folder with :func:`output_dir` before its first training step, so an
unusable ``--out`` or ``--checkpoint-dir`` fails at once, not after hours of training. Every file is written
with :func:`write_atomic`: to a temporary file in the same folder, then ``os.replace``, so a failed write
(disk full, a kill) leaves the previous good file in place and no partial file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


class OutputError(ValueError):
    """An output location that cannot be used; the message names the option (or argument) and the path."""


def output_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder that exists and can be written (created when missing); else :class:`OutputError`.

    ``what`` names the setting in the message, e.g. ``"--checkpoint-dir"``. Writability is probed by creating
    and removing a file, which also catches read-only mounts that permission bits do not show.
    """
    path = Path(path)
    for above in (path, *path.parents):  # the first thing on the way that exists must be a folder
        if above.exists():
            if not above.is_dir():
                where = "is a file, not a folder" if above == path else f"cannot be created: {above} is a file"
                raise OutputError(f"{what} {path} {where}")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{what} {path} is not writable: {exc.strerror or exc}") from None
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[IO], object], *, binary: bool = False,
                 newline: str | None = None) -> Path:
    """Write ``path`` through ``write(f)`` on a temporary file in its folder, then move it into place.

    On any failure the temporary file is removed and ``path`` keeps its previous content; the error is raised.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make every output private to its writer
        with os.fdopen(fd, "wb" if binary else "w", newline=newline) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of ``text``."""
    return write_atomic(path, lambda f: f.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`write_atomic` of ``data``."""
    return write_atomic(path, lambda f: f.write(data), binary=True)


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex (read 1 MB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
