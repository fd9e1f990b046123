"""A TFX fileio file system over real files, each call delayed and counted, for tests and benchmarks.

`lagged://<path>` is `<path>` (a local path, or any tf.io.gfile path such as ram://...) seen
through `tfx.dsl.io.fileio`, which TFX's span resolution and input fingerprint use: every glob and
stat waits `LaggedFilesystem.delay` seconds first, as a round trip to object storage would, and
globs, stats and the stats in flight at once are counted. Local stats report the file's
nanosecond mtime (TF's local file system truncates it to seconds; GCS reports milliseconds).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import tensorflow as tf
from tfx.dsl.io import filesystem, filesystem_registry

SCHEME = "lagged://"


@dataclass
class Stat:
    """What TFX reads of tf.io.gfile.stat: size, mtime in nanoseconds, is_directory."""

    length: int
    mtime_nsec: int
    is_directory: bool


class LaggedFilesystem(filesystem.Filesystem):
    """`lagged://<path>`: `<path>` with `delay` seconds before each glob and stat, stats counted."""

    SUPPORTED_SCHEMES = [SCHEME]
    delay = 0.0
    _lock = threading.Lock()
    globs = 0
    stats = 0
    in_flight = 0
    max_in_flight = 0

    @classmethod
    def reset(cls, delay: float = 0.0) -> None:
        """Set the delay and zero the counters."""
        with cls._lock:
            cls.delay, cls.globs, cls.stats, cls.in_flight, cls.max_in_flight = delay, 0, 0, 0, 0

    @staticmethod
    def open(name, mode="r"):
        """The file under it, through tf.io.gfile."""
        return tf.io.gfile.GFile(inner(name), mode)

    @staticmethod
    def exists(path) -> bool:
        """tf.io.gfile.exists of the path under it."""
        return tf.io.gfile.exists(inner(path))

    @staticmethod
    def isdir(path) -> bool:
        """tf.io.gfile.isdir of the path under it."""
        return tf.io.gfile.isdir(inner(path))

    @staticmethod
    def listdir(path) -> list[str]:
        """tf.io.gfile.listdir of the path under it."""
        return tf.io.gfile.listdir(inner(path))

    @staticmethod
    def glob(pattern) -> list[str]:
        """tf.io.gfile.glob under it, after the delay, named lagged://; counted."""
        with LaggedFilesystem._lock:
            LaggedFilesystem.globs += 1
        time.sleep(LaggedFilesystem.delay)
        try:
            return [SCHEME + path for path in tf.io.gfile.glob(inner(pattern))]
        except tf.errors.NotFoundError:
            return []

    @staticmethod
    def stat(path) -> Stat:
        """The file's size and nanosecond mtime, after the delay; counted while in flight."""
        cls = LaggedFilesystem
        with cls._lock:
            cls.stats += 1
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            time.sleep(cls.delay)
            path = inner(path)
            if "://" in path:
                found = tf.io.gfile.stat(path)
                return Stat(found.length, found.mtime_nsec, found.is_directory)
            found = os.stat(path)
            return Stat(found.st_size, found.st_mtime_ns, os.path.isdir(path))
        finally:
            with cls._lock:
                cls.in_flight -= 1


def inner(path) -> str:
    """The path under `lagged://`."""
    path = os.fsdecode(path)
    assert path.startswith(SCHEME), path
    return path[len(SCHEME) :]


filesystem_registry.DEFAULT_FILESYSTEM_REGISTRY.register(LaggedFilesystem, priority=0)
