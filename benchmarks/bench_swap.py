"""Version swap under load: how long after a new version's saved_model.pb lands does it answer?

`van-tfx serve` (a subprocess) serves a VAN-tiny `predict_images` model exported the way the
Trainer exports it (variables tracked, the Keras model not); four gRPC clients call it without
pause; a new version is copied into the base path like TFX's Pusher does (saved_model.pb last).
Measured in one run on a quiet box and with busy neighbours (processes spinning on the CPU), and,
with --baseline-src, for an older van-tfx serve too, alternating; printed with the CPU:

  live after   seconds from saved_model.pb written to the first answer from the new version
  failed       requests that did not succeed during the run (must be 0)

Run: TF_USE_LEGACY_KERAS=1 .venv/bin/python benchmarks/bench_swap.py [--neighbours 1]
     [--model PUSHED_VERSION_DIR] [--baseline-src DIR (e.g. git archive BASE serving van_tfx)]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import van_tfx  # noqa: F401  (Keras 2 before TensorFlow)

ENV = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def build_van_serving_module(image_size: int = 32, variant: str = "tiny", classes: int = 10):
    """VAN behind predict_images, saved like van_trainer.export.ServingModule (variables only)."""
    import tensorflow as tf

    from serving import testing
    from van_trainer.model import build_van, fold_for_inference

    model = fold_for_inference(build_van(variant, classes, (image_size, image_size, 3)))
    forward = [model]  # a list attribute would be tracked; a closure is not

    class VanModule(tf.Module):
        def __init__(self):
            super().__init__()
            self.model_variables = list(model.variables)
            self.synsets = tf.constant([f"n{i:08d}" for i in range(classes)])

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def predict_images(self, images):
            x = testing.decode_images(images, image_size)
            probabilities = tf.nn.softmax(forward[0](x, training=False))
            return testing.prediction_outputs(probabilities, self.synsets)

    return VanModule()


def main() -> int:
    """Export the model, measure the swaps, print the figures."""
    import tensorflow as tf

    from serving import testing
    from serving.loadtest import measure_swap

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbours", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", help="a pushed SavedModel dir (<home>/serving/van/<version>)")
    parser.add_argument("--baseline-src", help="a source tree whose van-tfx serve to compare")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())  # fmt: skip
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average now {os.getloadavg()[0]:.1f}")
    servers = {"this tree": None}
    if args.baseline_src:
        servers["baseline"] = os.path.abspath(args.baseline_src)
    image = testing.encode_image((200, 30, 90), size=64, fmt="JPEG")
    with tempfile.TemporaryDirectory(prefix="bench-swap-model-") as work:
        model_dir = args.model or os.path.join(work, "van")
        if not args.model:
            module = build_van_serving_module()
            signatures = {"predict_images": module.predict_images}
            tf.saved_model.save(module, model_dir, signatures=signatures)
            testing.write_warmup(model_dir, [image] * 4)
        for _ in range(args.rounds):
            for neighbours in sorted({0, args.neighbours}):
                for name, cwd in servers.items():
                    report = measure_swap(model_dir, image, neighbours, server_cwd=cwd)
                    live = report.live_after_seconds
                    print(
                        f"{name:>9}, {neighbours} busy neighbours: live after "
                        f"{'never' if live is None else f'{live:.1f} s'}, {report.errors} "
                        f"failed of {report.requests}, answers by version "
                        f"{dict(sorted(report.versions_seen.items()))}, load average "
                        f"{os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
