"""The files of the span a run would ingest, as the NewDataGate checks them before ingestion.

TFX's FileBasedInputProcessor resolves the newest `{SPAN}`; this module looks at that span's
files the way TFX's ExampleGen will read them, with one listing per split (no file is opened;
at ImageNet-1k a span is ~1,300 shards):

- **Spelling.** TFX reads span N from the pattern's spelling of N (`str(N)`, or zero-padded to
  the width of `{SPAN:w}`). A second directory holding the same number another way (`span-01`
  beside `span-1`) is never ingested, yet while TFX resolves the newest span its input
  fingerprint describes whichever of the two a listing returns first, which changes from call
  to call (tf.io.gfile's glob has no order); with a width, TFX stops at any directory of
  another width with "Glob pattern does not match regex pattern", naming nothing. Both are
  refused here naming the directories (SpanNamingError).
- **Completeness.** A span still being uploaded lacks shards of a `-NNNNN-of-MMMMM` set, or a
  split has no files of it yet (TFX then fails: "Latest span should be the same for each
  split"). `incompleteness` says so in words; the rule is ingest's own (van_tfx.shard_sets).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from tfx.components.example_gen import utils
from tfx.dsl.io import fileio
from tfx.proto import example_gen_pb2

from van_tfx.shard_sets import IncompleteShardsError, ShardSets, shard_sets

# What TFX 1.16's example_gen utils raise while resolving spans (utils._get_target_span_version,
# utils.calculate_splits_fingerprint_span_and_version): a file that does not fit the
# pattern's {SPAN:w} width, and a split with no file of the span asked for.
TFX_UNFIT_NAME = "Glob pattern does not match regex pattern"
TFX_NO_MATCH = "Cannot find matching for split"
# Stands in for the {SPAN} spec while the rest of a pattern is filled; no pattern holds it.
_MARK = "\x00"


class SpanNamingError(ValueError):
    """A span's files are in a directory TFX does not read, or in two; the message names them."""


@dataclass
class SpanFiles:
    """One split's files of one span: those TFX ingests, and any it never reads."""

    split: str
    pattern: str  # the split pattern with the span (and version) filled in, as TFX fills it
    paths: list[str]  # what `pattern` matches: what TFX ingests, in name order
    directory: str  # where TFX reads the span: the pattern up to the span's path component
    # Other spellings of the same span number (span-01 beside span-1): directory -> its files.
    others: dict[str, list[str]] = field(default_factory=dict)


def _split_at_span(split: example_gen_pb2.Input.Split, version: int | None, fill: str):
    # (the pattern before {SPAN}, the {SPAN} spec, after it), any {VERSION} filled with
    # `version` (TFX's spelling) or, when `version` is None, replaced by `fill`.
    spec = re.search(utils.SPAN_FULL_REGEX, split.pattern)
    marked = split.pattern[: spec.start()] + _MARK + split.pattern[spec.end() :]
    if version is None:
        marked = re.sub(utils.VERSION_FULL_REGEX, fill, marked)
    else:
        _, _, is_version = utils.verify_split_pattern_specs(split)
        marked = utils.get_pattern_for_span_version(marked, False, False, is_version, 0, version)
    before, after = marked.split(_MARK)
    return before, spec.group(0), after


def _component_end(path: str, start: int) -> str:
    # `path` up to the end of the path component that holds position `start`.
    end = path.find("/", start)
    return path if end < 0 else path[:end]


def span_files(
    input_base: str, split: example_gen_pb2.Input.Split, span: int, version: int | None
) -> SpanFiles:
    """A split's files of one span: where the pattern spells it, and any other spelling."""
    is_span, is_date, is_version = utils.verify_split_pattern_specs(split)
    filled = utils.get_pattern_for_span_version(
        split.pattern, is_span, is_date, is_version, span, version
    )
    pattern = os.path.join(input_base, filled)
    if not is_span:  # no span, or a date (fixed widths): one spelling
        return SpanFiles(split.name, pattern, sorted(fileio.glob(pattern)), pattern)
    before, spec, after = _split_at_span(split, version, "*")
    head = os.path.join(input_base, before)
    token = utils.get_pattern_for_span_version(spec, True, False, False, span, None)
    directory = _component_end(head + token + after, len(head) + len(token))
    # Every zero padding of N ends in N: `span-*1` lists span-1, span-01, span-001 (and span-11,
    # which the expression below leaves out). TFX's own glob-to-regex, so paths match as in TFX.
    spelled = re.compile(
        utils._glob_to_regex(head) + f"(?P<span>0*{span})" + utils._glob_to_regex(after)
    )
    files = SpanFiles(split.name, pattern, [], directory)
    for path in sorted(fileio.glob(head + "*" + str(span) + after)):
        match = spelled.fullmatch(path)
        if match is None:
            continue  # another span number
        if match["span"] == token:
            files.paths.append(path)
        else:
            other = _component_end(path, match.end("span"))
            files.others.setdefault(other, []).append(path)
    return files


def check_spelling(span: int, listed: list[SpanFiles], split_patterns: dict[str, str]) -> None:
    """Raise SpanNamingError naming the directories when a span is not (only) where TFX reads it."""
    # span-01 beside span-1 (span-1 is read, span-01 never), or span-01 alone (nothing is read).
    for files in listed:
        if not files.others:
            continue
        others = " and ".join(sorted(files.others))
        pattern = split_patterns[files.split]
        if files.paths:
            if re.search(utils.SPAN_FULL_REGEX, pattern).group("width"):
                unpinned = f"it stops at {others} without naming it ('{TFX_UNFIT_NAME}')"
            else:
                unpinned = (
                    "its input fingerprint describes whichever directory a listing returns "
                    "first, which changes from run to run"
                )
            raise SpanNamingError(
                f"span {span} is in more than one directory: {files.directory} and {others} "
                f"(the {files.split} split's pattern {pattern} matches each as span {span}). "
                f"TFX's ExampleGen ingests only {files.directory}, the pattern's spelling of "
                f"span {span}, and never reads {others}; resolving the newest span, {unpinned}. "
                f"Keep one directory per span: merge, rename or remove {others}"
            )
        raise SpanNamingError(
            f"span {span} is in {others}, but the {files.split} split's pattern {pattern} "
            f"spells span {span} as {files.directory}, where TFX's ExampleGen would look for "
            f"it and find nothing. Rename {others} to {os.path.basename(files.directory)}, "
            "or give the pattern's {SPAN} the width the directory uses (e.g. {SPAN:2} for 01)"
        )


def unfit_span_names(input_base: str, splits) -> str | None:
    """Why TFX raised TFX_UNFIT_NAME: the directories that miss the {SPAN:w} width, or None."""
    # Each with the directory of the same number that fits, if any. None: no such directory, so
    # TFX's error had another cause.
    for split in splits:
        spec = re.search(utils.SPAN_FULL_REGEX, split.pattern)
        if spec is None or not spec.group("width"):
            continue
        width = int(spec.group("width"))
        before, _, after = _split_at_span(split, None, "*")
        head = os.path.join(input_base, before)
        spelled = re.compile(
            utils._glob_to_regex(head) + r"(?P<span>[^\\/]*)" + utils._glob_to_regex(after)
        )
        fits, unfit = {}, {}
        for path in sorted(fileio.glob(head + "*" + after)):
            match = spelled.fullmatch(path)
            if match is None:
                continue
            token, directory = match["span"], _component_end(path, match.end("span"))
            # ASCII digits only: "²" passes str.isdigit and then int() raises.
            number = int(token) if token.isascii() and token.isdigit() else None
            (fits if len(token) == width else unfit)[directory] = number
        if not unfit:
            continue
        fitting = {number: directory for directory, number in fits.items()}
        named = []
        for directory, number in sorted(unfit.items()):
            if number is None:
                named.append(f"{directory} (no span number)")
            elif number in fitting:
                named.append(f"{directory} (span {number}, which is also in {fitting[number]})")
            else:
                named.append(f"{directory} (span {number})")
        twice = any(number in fitting for number in unfit.values())
        return (
            f"the {split.name} split's pattern {split.pattern} takes span numbers written with "
            f"{width} digits, and {'; '.join(named)} {'is' if len(named) == 1 else 'are'} not: "
            f"TFX's ExampleGen stops on such a directory without naming it ('{TFX_UNFIT_NAME}'). "
            "Rename or remove it"
            + (
                "; a span in two directories is read from the one the pattern spells"
                if twice
                else ""
            )
        )
    return None


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
