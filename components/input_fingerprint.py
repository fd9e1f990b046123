"""ExampleGen's input fingerprint exactly as TFX computes it, with the files stat'ed concurrently.

TFX's FileBasedInputProcessor fingerprints a span while it resolves it
(`utils.calculate_splits_fingerprint_span_and_version` -> `io_utils.generate_fingerprint`), and
generate_fingerprint stats the span's files one after another (`for f in files: fileio.stat(f)`).
On object storage each stat is a round trip (TF's GcsFileSystem::Stat is a metadata GET per
object; its listing asks for names only, so nothing is cached from the glob): ImageNet-1k's
~1,301 shards were ~1,301 round trips in a row, paid by the NewDataGate on every run, idle ones
included, and again by each ExampleGen that resolves its span. Here the same stats run
CONCURRENT_CALLS at a time (`van_tfx.storage.for_each_file`).

The string must be TFX's byte for byte: on LocalDagRunner and Vertex TFX's driver computes the
fingerprint ImportExampleGen records, and the gate compares its own with records made from it.
So the span and version come from TFX's own per-split resolution (`utils._get_target_span_version`,
TFX 1.16 as uv.lock pins it), and the fingerprint from the same glob, stats and arithmetic as
generate_fingerprint; tests/test_input_fingerprint.py checks equality with TFX's function on
random file sets.
"""

from __future__ import annotations

import copy
import os

from tfx.components.example_gen import driver, input_processor, utils
from tfx.dsl.io import fileio
from tfx.utils import io_utils

from van_tfx import storage

# io_utils.generate_fingerprint's line for one split.
_LINE = "split:%s,num_files:%d,total_bytes:%d,xor_checksum:%d,sum_checksum:%d"


def resolve_splits(input_base_uri: str, splits, range_config=None) -> tuple[int, int | None]:
    """(span, version) as TFX's resolution finds them, its errors and filled-in patterns too."""
    # TFX's loop (calculate_splits_fingerprint_span_and_version), line for line, minus the
    # fingerprint it computes between splits; each split's pattern is filled in place, as there.
    select_span, select_version = 0, None
    for split in splits:
        target_span, target_version = utils._get_target_span_version(
            input_base_uri, split, range_config=range_config
        )
        target_span = target_span or 0
        if select_span == 0 and select_version is None:
            select_span, select_version = target_span, target_version
        if select_span != target_span:
            raise ValueError("Latest span should be the same for each split")
        if select_version != target_version:
            raise ValueError("Latest version should be the same for each split")
    return select_span, select_version


def fingerprint_lines(patterns: list[tuple[str, str]]) -> list[str]:
    """generate_fingerprint's line for each (split name, full pattern), all stats concurrent."""
    # Every file of every split in one pool of CONCURRENT_CALLS, then TFX's sums split by split.
    listed = [(name, fileio.glob(pattern)) for name, pattern in patterns]
    stats = iter(storage.for_each_file(fileio.stat, [f for _, files in listed for f in files]))
    lines = []
    for name, files in listed:
        total_bytes = xor_checksum = sum_checksum = 0
        for _ in files:
            stat = next(stats)
            total_bytes += stat.length
            # TFX's arithmetic exactly: true division, then int() (not //, which rounds
            # differently for a few nanosecond mtimes just below a whole second).
            mtime = int(stat.mtime_nsec / io_utils.NANO_PER_SEC)
            xor_checksum ^= mtime
            sum_checksum += mtime
        lines.append(_LINE % (name, len(files), total_bytes, xor_checksum, sum_checksum))
    return lines


def generate_fingerprint(split_name: str, file_pattern: str) -> str:
    """io_utils.generate_fingerprint's string, the files stat'ed CONCURRENT_CALLS at a time."""
    return fingerprint_lines([(split_name, file_pattern)])[0]


def calculate_splits_fingerprint_span_and_version(
    input_base_uri: str, splits, range_config=None
) -> tuple[str, int, int | None]:
    """TFX's (fingerprint, span, version) of the same name, the patterns filled in likewise."""
    span, version = resolve_splits(input_base_uri, splits, range_config)
    patterns = [(split.name, os.path.join(input_base_uri, split.pattern)) for split in splits]
    return "\n".join(fingerprint_lines(patterns)), span, version


class InputProcessor(input_processor.FileBasedInputProcessor):
    """TFX's FileBasedInputProcessor, its input fingerprint's stats made concurrently."""

    def resolve_span_and_version(self, fingerprint: bool = True) -> tuple[int, int | None]:
        """(span, version) as TFX resolves them; computes the fingerprint unless told not to."""
        # TFX's own method copies the splits too: the patterns given stay unfilled.
        splits = [copy.deepcopy(split) for split in self._splits]
        if not fingerprint:
            return resolve_splits(self._input_base_uri, splits, self._range_config)
        self._fingerprint, span, version = calculate_splits_fingerprint_span_and_version(
            self._input_base_uri, splits, self._range_config
        )
        return span, version


class FileBasedDriver(driver.FileBasedDriver):
    """TFX's ImportExampleGen driver (LocalDagRunner runs it) with InputProcessor above."""

    def get_input_processor(self, splits, range_config=None, input_base_uri=None):
        """The InputProcessor of this module, where TFX's driver makes its own."""
        assert input_base_uri
        return InputProcessor(input_base_uri, splits, range_config)
