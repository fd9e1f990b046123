"""A self-contained HTML run report: data statistics, metrics vs baseline, curves, confusion."""

from __future__ import annotations

import base64
import glob
import html
import io
import os
from pathlib import Path

import numpy as np

CURVES_FILE = "training_curves.png"


def write_report(path: str | Path, outputs: dict[str, list], outcome) -> str:
    """Write the HTML report of a run to `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sections = [
        decision_section(outcome),
        metrics_section(outcome),
        image_section("Training curves", training_curves_png(outputs)),
        image_section("Confusion matrix (validation)", confusion_matrix_png(outputs)),
        statistics_section(outputs),
    ]
    title = f"van-tfx run {html.escape(outcome.run_id)}"
    body = "\n".join(s for s in sections if s)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_CSS}</style></head><body><h1>{title}</h1>{body}</body></html>"
    )
    return str(path)


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
    "th{background:#f3f3f3}.ok{color:#080}.bad{color:#b00}img{max-width:100%}"
)


def decision_section(outcome) -> str:
    """Pushed or not, and why."""
    if outcome.pushed:
        verdict = (
            f"<p class='ok'>Pushed version {html.escape(str(outcome.pushed_version))} to "
            f"{html.escape(str(outcome.pushed_path))}</p>"
        )
    elif not outcome.trained:
        verdict = "<p>Trained nothing, pushed nothing.</p>"
    else:
        verdict = "<p class='bad'>Not pushed.</p>"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in outcome.reasons)
    server = (
        f"<p>Smoke-tested with {html.escape(outcome.model_server)}.</p>"
        if outcome.model_server
        else ""
    )
    return f"<h2>Decision</h2>{verdict}<ul>{reasons}</ul>{server}"


def metrics_section(outcome) -> str:
    """Candidate metrics next to the baseline's."""
    if not outcome.metrics:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{value:.4f}</td>"
        f"<td>{_fmt(outcome.baseline_metrics.get(name))}</td></tr>"
        for name, value in sorted(outcome.metrics.items())
    )
    return (
        "<h2>Evaluation (TFMA, validation split)</h2><table><tr><th>metric</th>"
        f"<th>candidate</th><th>baseline</th></tr>{rows}</table>"
    )


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def image_section(title: str, png: bytes | None) -> str:
    """An embedded PNG (data URI keeps the report one file)."""
    if not png:
        return ""
    data = base64.b64encode(png).decode()
    return f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{data}'>"


def training_curves_png(outputs: dict[str, list]) -> bytes | None:
    """The Trainer's curves PNG from its ModelRun artifact."""
    for run in outputs.get("ModelRun", []):
        matches = glob.glob(os.path.join(run.uri, "**", CURVES_FILE), recursive=True)
        if matches:
            return Path(matches[0]).read_bytes()
    return None


def confusion_matrix_png(outputs: dict[str, list]) -> bytes | None:
    """Render TFMA's multi-class confusion matrix of the overall slice."""
    evaluations = outputs.get("ModelEvaluation", [])
    if not evaluations:
        return None
    matrix = confusion_matrix(evaluations[0].uri)
    if matrix is None:
        return None
    from matplotlib import pyplot as plt

    fig = confusion_matrix_figure(matrix)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# Counts are written in the cells up to this many classes; past it (ImageNet-1k: ~10^4 non-zero
# cells on a 550 px image) they would be unreadable and take seconds to lay out.
MAX_LABELLED_CLASSES = 30


def confusion_matrix_figure(matrix: np.ndarray):
    """A matplotlib figure of a [true, predicted] count matrix, counts in cells when few classes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xlabel("predicted class id")
    ax.set_ylabel("true class id")
    if max(matrix.shape) <= MAX_LABELLED_CLASSES:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, int(count), ha="center", va="center", fontsize=7)
    return fig


def confusion_matrix(evaluation_uri: str) -> np.ndarray | None:
    """The overall slice's confusion matrix as a dense [true, predicted] count array."""
    import tensorflow_model_analysis as tfma

    for plots in tfma.load_plots(evaluation_uri):
        if plots.slice_key.single_slice_keys:
            continue
        for item in plots.plot_keys_and_values:
            if item.key.model_name == "baseline":
                continue
            matrices = item.value.multi_class_confusion_matrix_at_thresholds.matrices
            if not matrices:
                continue
            entries = matrices[0].entries
            size = 1 + max(max(e.actual_class_id, e.predicted_class_id) for e in entries)
            dense = np.zeros((size, size))
            for e in entries:
                if e.predicted_class_id >= 0:  # -1 means "no prediction above threshold"
                    dense[e.actual_class_id, e.predicted_class_id] = e.num_weighted_examples
            return dense
    return None


def statistics_section(outputs: dict[str, list]) -> str:
    """A per-feature summary of TFDV statistics for each split."""
    import tensorflow_data_validation as tfdv

    parts = []
    for stats_artifact in outputs.get("ExampleStatistics", [])[:1]:
        for split_dir in sorted(glob.glob(os.path.join(stats_artifact.uri, "Split-*"))):
            stats_file = os.path.join(split_dir, "FeatureStats.pb")
            if not os.path.exists(stats_file):
                continue
            dataset = tfdv.load_stats_binary(stats_file).datasets[0]
            split = os.path.basename(split_dir)[len("Split-") :]
            parts.append(f"<h3>{html.escape(split)}: {dataset.num_examples} examples</h3>")
            parts.append(feature_table(dataset))
    return "<h2>Data statistics (TFDV)</h2>" + "".join(parts) if parts else ""


def feature_table(dataset) -> str:
    """One row per feature: type, missing, and a numeric range or string cardinality."""
    rows = []
    for feature in dataset.features:
        name = ".".join(feature.path.step)
        kind = feature.WhichOneof("stats")
        if kind == "num_stats":
            s = feature.num_stats
            common, detail = s.common_stats, f"min {s.min:g} · mean {s.mean:.3g} · max {s.max:g}"
        elif kind == "string_stats":
            s = feature.string_stats
            common, detail = s.common_stats, f"{s.unique} unique"
        elif kind == "bytes_stats":
            s = feature.bytes_stats
            common, detail = s.common_stats, f"avg {s.avg_num_bytes:.0f} bytes"
        else:
            continue
        rows.append(
            f"<tr><th>{html.escape(name)}</th><td>{kind.split('_')[0]}</td>"
            f"<td>{common.num_non_missing}</td><td>{common.num_missing}</td>"
            f"<td>{html.escape(detail)}</td></tr>"
        )
    return (
        "<table><tr><th>feature</th><th>type</th><th>present</th><th>missing</th>"
        f"<th>summary</th></tr>{''.join(rows)}</table>"
    )
