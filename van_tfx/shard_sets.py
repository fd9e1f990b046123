"""Input shard sets: whether a split's `<name>-NNNNN-of-MMMMM` shards form complete sets.

One rule, two callers. ImportExampleGen's executor (components/example_gen.py) refuses a split
whose shards are not complete sets (`check_shard_set` raises IncompleteShardsError). The
NewDataGate (components/new_data_gate.py), which runs first, reads the same `ShardSets` to tell
a span still being uploaded (shards missing: wait for the next run) from one that is wrong
(refused as ingest would refuse it). It lives here, in the base package, because the executor
imports the gate's module: neither component module can import the other's.

Both need only the files' names, one listing per split; no shard is opened.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
from dataclasses import dataclass

# TF's and our converters' shard names: train-00007-of-01024, optionally GZIP.
SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<index>[0-9]{5,})-of-(?P<total>[0-9]{5,})(?:\.gz)?")
# Missing shards named in a message; the rest are counted.
_NAMED = 5


class IncompleteShardsError(ValueError):
    """A split whose numbered shards are not exactly one complete set."""


@dataclass(frozen=True)
class MissingShards:
    """The shards absent from one `<stem>-*-of-<total>` set: how many are there, which are not."""

    stem: str
    total: int
    present: int  # distinct shard numbers of the set that are there
    names: tuple[str, ...]  # the first missing shards' names (at most _NAMED), in shard order
    count: int  # how many are missing

    def named(self) -> str:
        """The first missing names, then how many more: `a, b, c, d, e and 8 more`."""
        more = f" and {self.count - len(self.names)} more" if self.count > len(self.names) else ""
        return f"{', '.join(self.names)}{more}"

    def problem(self) -> str:
        """This set's line in ingest's refusal."""
        return f"{self.count} of {self.total} shards missing: {self.named()}"


@dataclass(frozen=True)
class ShardSets:
    """A split's shards against the rule: every problem (ingest's words) and what is missing."""

    split: str
    pattern: str
    problems: tuple[str, ...]
    missing: tuple[MissingShards, ...]

    def other_problems(self) -> list[str]:
        """The problems that are not missing shards (two sets, duplicates, stray names)."""
        missing = {shards.problem() for shards in self.missing}
        return [problem for problem in self.problems if problem not in missing]

    def refusal(self) -> str:
        """Ingest's message for these problems."""
        return (
            f"the {self.split} split's shards ({self.pattern}) are not complete sets (is the "
            f"span still being uploaded?): {'; '.join(self.problems)}"
        )


def shard_sets(split: str, pattern: str, paths: list[str]) -> ShardSets:
    """The problems and missing shards of a split's `paths` (what its `pattern` matched)."""
    # The rule: shards named `<name>-NNNNN-of-MMMMM[.gz]` form complete sets, one per name.
    # A list, not a dict by path: a path listed twice counts twice, as the rule says.
    numbered = [(path, SHARD_NAME.fullmatch(os.path.basename(path))) for path in paths]
    if not any(m for _, m in numbered):
        return ShardSets(split, pattern, (), ())  # names without shard numbers: nothing to check
    problems = [f"{path} is not named <name>-NNNNN-of-MMMMM" for path, m in numbered if not m]
    missing = []
    by_stem = collections.defaultdict(list)  # one pattern may take several sets (train-*, extra-*)
    for m in filter(None, (m for _, m in numbered)):
        by_stem[m["stem"]].append((int(m["index"]), int(m["total"])))
    for stem, shards in sorted(by_stem.items()):
        stem_problems, stem_missing = _set_problems(stem, shards)
        problems += stem_problems
        missing += stem_missing
    return ShardSets(split, pattern, tuple(problems), tuple(missing))


def check_shard_set(split: str, pattern: str, paths: list[str]) -> None:
    """Raise IncompleteShardsError unless the split's numbered shards form complete sets."""
    # A span still being uploaded, an older set beside a newer one, a shard both plain and GZIP,
    # or a partial upload's temporary file were all ingested silently.
    sets = shard_sets(split, pattern, paths)
    if sets.problems:
        raise IncompleteShardsError(sets.refusal())


def _set_problems(stem: str, shards: list[tuple[int, int]]) -> tuple[list[str], list]:
    totals = sorted({total for _, total in shards})
    if len(totals) > 1:
        sets = ", ".join(f"{stem}-*-of-{total:05d}" for total in totals)
        return [f"more than one set of shards: {sets}"], []
    total, seen = totals[0], collections.Counter(index for index, _ in shards)
    problems, missing = [], []
    # Counted, and only the named few built: the total comes from a file name, and one file
    # `train-00000-of-1000000000` made a list of 10**9 names (10**7 took 5.8 s and 0.9 GB) in
    # the gate of every scheduled run. The first _NAMED absent numbers lie among the first
    # len(seen) + _NAMED, so the scan is bounded by the files there, not by the total.
    present = sum(1 for index in seen if index < total)
    if present < total:
        absent = itertools.islice((i for i in range(total) if i not in seen), _NAMED)
        names = tuple(f"{stem}-{i:05d}-of-{total:05d}" for i in absent)
        missing.append(MissingShards(stem, total, present, names, total - present))
        problems.append(missing[-1].problem())
    for index, count in sorted(seen.items()):
        if count > 1:
            problems.append(
                f"{stem} shard {index} of {total} is there {count} times (plain and .gz?)"
            )
        if index >= total:
            problems.append(f"{stem} shard {index} is beyond -of-{total:05d}")
    return problems, missing
