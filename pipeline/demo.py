"""`make demo`: bundled sample → whole pipeline → local TF-Serving-compatible server → gRPC."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from serving.manager import version_dirs
from van_tfx.config import Config

DEMO_BATCH = 32


def run_demo(config: Config, *, num_predictions: int = 8, echo=print) -> int:
    """Run every stage a user would, print predictions next to true labels; 0 on success."""
    from pipeline.local import run_locally
    from pipeline.outcome import print_outcome

    ensure_sample_data(config, echo)
    echo("== Pipeline ==")
    outcome = run_locally(config, echo=echo)
    print_outcome(outcome)
    version = latest_version(config.serving_base_path)
    if version is None:
        echo(f"No model has been pushed to {config.serving_base_path}; nothing to serve.")
        return 1
    echo(f"== Serving version {version} of {config.serving.model_name!r} over gRPC ==")
    records = validation_records(config)
    accuracy = serve_and_predict(config, records, num_predictions, echo)
    echo(f"top-1 on {len(records)} validation images through predict_images: {accuracy:.3f}")
    if outcome.report_path:
        echo(f"Run report: {outcome.report_path}")
    return 0


def ensure_sample_data(config: Config, echo) -> None:
    """Build the bundled digits sample into the data dir unless data is already there."""
    from van_tfx.data.sample import build_sample, existing_spans

    if existing_spans(config.data_dir):
        echo(f"== Data == using {config.data_dir}")
        return
    echo(f"== Data == building the bundled digits sample in {config.data_dir}")
    build_sample(str(config.data_dir))


def latest_version(base_path: Path) -> int | None:
    """Highest version with a saved_model.pb (what TF Serving would load)."""
    # Version names are read as the server reads them (serving.manager).
    return max(version_dirs(str(base_path)) or {}, default=None)


def validation_records(config: Config) -> list[tuple[bytes, str]]:
    """(JPEG bytes, true synset) for every validation image of the newest span."""
    from van_tfx import features
    from van_tfx.data.records import read_examples
    from van_tfx.data.sample import existing_spans

    span_dir = config.data_dir / f"span-{existing_spans(config.data_dir)[-1]}"
    files = sorted(glob.glob(str(span_dir / "validation-*")))
    return [
        (example[features.IMAGE_ENCODED], example[features.SYNSET].decode())
        for example in read_examples(files)
    ]


def serve_and_predict(config: Config, records, num_predictions: int, echo) -> float:
    """Start the server on the serving base path, print a few predictions, return top-1."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving.client import predict_images
    from serving.process import running_model_server

    name = config.serving.model_name
    with running_model_server(str(config.serving_base_path), name) as (channel, port):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        echo(f"server up on 127.0.0.1:{port}; {min(num_predictions, len(records))} predictions:")
        top1 = []
        for start in range(0, len(records), DEMO_BATCH):
            batch = records[start : start + DEMO_BATCH]
            top_k = predict_images(stub, [image for image, _ in batch], name, timeout=120)
            rows = [
                (classes[0].synset, classes[0].score, true)
                for classes, (_, true) in zip(top_k, batch, strict=True)
            ]
            top1.extend(predicted == true for predicted, _, true in rows)
            # The first num_predictions of all batches (only the first batch's were printed).
            for predicted, score, true in rows[: max(0, num_predictions - start)]:
                mark = "ok " if predicted == true else "BAD"
                echo(f"  {mark} true {true:<10} predicted {predicted:<10} p={score:.3f}")
    echo("server stopped")
    return float(np.mean(top1))
