"""Bounded reads of the files an operator (or anyone who can write them) hands the server: a
config file may be a multi-GB file, /dev/zero or a FIFO, and a whole-file read would hold it all."""

from __future__ import annotations

import os
import stat


class FileTooLargeError(ValueError):
    """A file larger than what its reader accepts (named, with the limit)."""


def read_prefix(path: str | os.PathLike, limit: int) -> bytes:
    """At most `limit` + 1 bytes of `path` from its start (more than `limit`: the file is larger)."""
    with open(path, "rb") as f:
        # One read of limit + 1 bytes, never the whole file: /dev/zero or a growing file too.
        return f.read(limit + 1)


def read_bounded(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of `path`; FileTooLargeError naming it (as `what`) when over `limit` bytes."""
    with _open_unblocked(path) as f:
        info = os.fstat(f.fileno())
        # A regular file's size is known before reading a byte; anything else (a FIFO, a
        # device) is read up to the limit.
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise FileTooLargeError(_too_large(what, path, f"{info.st_size} bytes", limit))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileTooLargeError(_too_large(what, path, f"over {limit} bytes", limit))
    return data


def _open_unblocked(path: str | os.PathLike):
    """`path` opened for reading without waiting for a FIFO's writer.

    open() of a FIFO with no writer blocks, and in a system call Python retries after each
    signal: `van-tfx serve --model_config_file=<fifo>` hung, SIGTERM or not. O_NONBLOCK opens
    at once; cleared again, reads block as usual, and with no writer they read end of file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _too_large(what: str, path, size: str, limit: int) -> str:
    return f"{what} {path} is {size}, more than the {limit} bytes this server reads from it"


def irregular_kind(path: str | os.PathLike) -> str | None:
    """What a local `path` is when it exists and is not a regular file ("a FIFO", ...), else None."""
    # Never opens it: opening a FIFO blocks until someone writes to it.
    if "://" in str(path):
        return None  # object storage holds only regular objects
    try:
        mode = os.stat(path).st_mode  # follows symlinks, as open() would
    except OSError:
        return None  # missing or unreadable: the reader reports it with its own error
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISDIR: "a directory", stat.S_ISSOCK: "a socket"}
    return next((kind for test, kind in kinds.items() if test(mode)), "a device")
