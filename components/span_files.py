"""The files of the span a run would ingest, as the NewDataGate checks them before ingestion.

TFX's FileBasedInputProcessor resolves the newest `{SPAN}`; this module looks at that span's
files the way TFX's ExampleGen will read them, with one listing per split (no file is opened;
at ImageNet-1k a span is ~1,300 shards). A span still being uploaded lacks shards of a
`-NNNNN-of-MMMMM` set, or a split has no files of it yet (TFX then fails: "Latest span should
be the same for each split"). `incompleteness` says so in words; the rule is ingest's own
(van_tfx.shard_sets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tfx.components.example_gen import utils
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2

from van_tfx.shard_sets import IncompleteShardsError, ShardSets, shard_sets

# What TFX 1.16's example_gen utils raise while resolving spans (utils._get_target_span_version)
# for a split with no file of the span asked for.
TFX_NO_MATCH = "Cannot find matching for split"


@dataclass
class SpanFiles:
    """One split's files of one span, as TFX ingests them."""

    split: str
    pattern: str  # the split pattern with the span (and version) filled in, as TFX fills it
    paths: list[str]  # what `pattern` matches: what TFX ingests, in name order


def span_files(
    input_base: str, split: example_gen_pb2.Input.Split, span: int, version: int | None
) -> SpanFiles:
    """A split's files of one span, where the pattern spells it (one listing)."""
    is_span, is_date, is_version = utils.verify_split_pattern_specs(split)
    filled = utils.get_pattern_for_span_version(
        split.pattern, is_span, is_date, is_version, span, version
    )
    pattern = os.path.join(input_base, filled)
    return SpanFiles(split.name, pattern, sorted(fileio.glob(pattern)))


def _missing_line(sets: ShardSets) -> str:
    parts = [
        f"{m.present} of {m.total} {'' if m.stem == sets.split else m.stem + ' '}shards "
        f"(missing {m.named()})"
        for m in sets.missing
    ]
    line = f"{sets.split} has {' and '.join(parts)}"
    other = sets.other_problems()
    return f"{line}, and {'; '.join(other)}" if other else line


def incompleteness(
    what: str, listed: list[SpanFiles], lacking: set[str] = frozenset()
) -> str | None:
    """Why span `what` is still incomplete, per split; None when it is complete."""
    # The splits in `lacking` have no file of the span yet. Shards wrong in another way (two
    # sets, a duplicate) are named too while something is missing; with nothing missing they
    # raise IncompleteShardsError, as ingest would: waiting would not mend them.
    lines, refusals = [], []
    for files in listed:
        if files.split in lacking:
            lines.append(f"{files.split} has no files of it yet ({files.pattern})")
            continue
        sets = shard_sets(files.split, files.pattern, files.paths)
        if sets.missing:
            lines.append(_missing_line(sets))
        elif sets.problems:
            refusals.append(sets)
    if not lines and refusals:
        # Nothing missing, so no upload in progress: what ingest would refuse, refused now.
        raise IncompleteShardsError(refusals[0].refusal())
    if not lines:
        return None
    lines += [f"{sets.split}: {'; '.join(sets.problems)}" for sets in refusals]
    return f"{what} is still incomplete: {'; '.join(lines)}"
