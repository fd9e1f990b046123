"""Tiny SavedModels with the van-tfx serving signatures, for tests, benchmarks and demos.

They mirror the Trainer's export contract without training anything: `serving_default` takes
serialized tf.Examples (float feature "x" of length 3) and `predict_images` takes encoded images.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np

from van_tfx.saved_model import mark_classification_signature

SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")
CLASS_TEXT = ("tench", "goldfish", "great white shark", "tiger shark")
_WEIGHTS = np.array(
    [[4.0, -2.0, 0.0, 1.0], [-1.0, 3.0, 0.5, 0.0], [0.0, 0.0, 2.0, -3.0]], dtype=np.float32
)


def encode_image(rgb: tuple[int, int, int], size: int = 8, fmt: str = "PNG") -> bytes:
    """A solid-colour image encoded as PNG or JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), tuple(rgb)).save(buffer, format=fmt)
    return buffer.getvalue()


def expected_probabilities(rgb_batch: np.ndarray, bias: float = 0.0) -> np.ndarray:
    """What the tiny model computes for mean RGB values in [0, 1] (numpy reference)."""
    logits = rgb_batch.astype(np.float32) @ _WEIGHTS + bias
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def build_tiny_model(top_k: int = 2, bias: float = 0.0):
    """A tf.Module whose signatures match the Trainer's export (linear softmax on mean RGB)."""
    import tensorflow as tf

    class TinyVan(tf.Module):
        def __init__(self):
            super().__init__()
            self.weights_ = tf.Variable(_WEIGHTS, trainable=False)
            self.bias = tf.Variable(bias, trainable=False)
            self.synsets = tf.constant(SYNSETS)

        def _probabilities(self, rgb):
            return tf.nn.softmax(tf.matmul(rgb, self.weights_) + self.bias)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def predict_images(self, images):
            rgb = tf.map_fn(_mean_rgb, images, fn_output_signature=tf.TensorSpec([3], tf.float32))
            return prediction_outputs(self._probabilities(rgb), self.synsets, k=top_k)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def predict_probabilities(self, images):
            return {"probabilities": self.predict_images(images)["probabilities"]}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serving_default(self, examples):
            spec = {"x": tf.io.FixedLenFeature([3], tf.float32)}
            rgb = tf.io.parse_example(examples, spec)["x"]
            probabilities = self._probabilities(rgb)
            classes = tf.tile(self.synsets[tf.newaxis], [tf.shape(rgb)[0], 1])
            return {"probabilities": probabilities, "classes": classes}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs):
            outputs = self.serving_default(inputs)
            return {"classes": outputs["classes"], "scores": outputs["probabilities"]}

    return TinyVan()


def build_numbers_model():
    """A model with numeric inputs and a slow signature, for request-handling tests."""
    # `serving_default`: `x` float32 [N, 2] and `k` int64 [N] -> `total` float32 [N] (row sum + k)
    # and `labels_bytes` string [N]; `regress`: serialized tf.Examples `inputs` -> `outputs` float32
    # [N] (sum of feature "x"); `spin`: `n` int64 [] -> `acc` float32 [], a loop of n steps.
    import tensorflow as tf

    class Numbers(tf.Module):
        @tf.function(
            input_signature=[
                tf.TensorSpec([None, 2], tf.float32, name="x"),
                tf.TensorSpec([None], tf.int64, name="k"),
            ]
        )
        def serving_default(self, x, k):
            total = tf.reduce_sum(x, axis=1) + tf.cast(k, tf.float32)
            return {"total": total, "labels_bytes": tf.strings.as_string(k)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs):
            x = tf.io.parse_example(inputs, {"x": tf.io.VarLenFeature(tf.float32)})["x"]
            return {"outputs": tf.sparse.reduce_sum(x, axis=1)}

        @tf.function(input_signature=[tf.TensorSpec([], tf.int64, name="n")])
        def spin(self, n):
            def step(i, acc):
                return i + 1, acc + tf.sin(tf.cast(i, tf.float32))

            _, acc = tf.while_loop(lambda i, acc: i < n, step, [tf.constant(0, tf.int64), 0.0])
            return {"acc": acc}

    return Numbers()


def build_heavy_model(steps: int = 500, signatures: int = 3):
    """A model that takes seconds to load and warm up, like the pipeline's export; quick to save."""
    # It exports in seconds: `signatures` image signatures (`predict_images`, `predict_1`, ...),
    # each a chain of `steps` elementwise ops, to restore as Python graphs and optimise on first
    # call.
    import tensorflow as tf

    class Heavy(tf.Module):
        def __init__(self):
            super().__init__()
            self.weights_ = tf.Variable(_WEIGHTS, trainable=False)
            self.synsets = tf.constant(SYNSETS)

    module = Heavy()

    def signature(seed: int):
        @tf.function(
            input_signature=[tf.TensorSpec([None], tf.string, name="images")], autograph=False
        )
        def predict(images):
            rgb = tf.reduce_mean(decode_images(images, 8), axis=[1, 2])
            for i in range(steps):  # distinct constants: nothing for grappler to merge away
                rgb = tf.tanh(rgb * (1.0 + 1e-4 * ((i + seed) % 7)) + 1e-3)
            probabilities = tf.nn.softmax(rgb @ module.weights_)
            return prediction_outputs(probabilities, module.synsets, k=2)

        return predict

    module.signature_functions = {
        "predict_images" if i == 0 else f"predict_{i}": signature(i) for i in range(signatures)
    }
    return module


def _mean_rgb(encoded):
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.reduce_mean(tf.cast(image, tf.float32), axis=[0, 1]) / 255.0


def build_conv_model(
    image_size: int = 32, width: int = 16, depth: int = 4, classes: int = 10, head_layers: int = 0
):
    """A small conv net behind `predict_images` (plus `head_layers` dense layers of `width`)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    class ConvNet(tf.Module):
        def __init__(self):
            super().__init__()
            shapes = [(3, 3, 3, width)] + [(3, 3, width, width)] * (depth - 1)
            self.kernels = [
                tf.Variable(rng.normal(0, 0.2, s).astype(np.float32), trainable=False)
                for s in shapes
            ]
            self.dense = [
                tf.Variable(rng.normal(0, 0.3, (width, width)).astype(np.float32), trainable=False)
                for _ in range(head_layers)
            ]
            self.head = tf.Variable(rng.normal(0, 0.2, (width, classes)).astype(np.float32))
            self.synsets = tf.constant([f"n{i:08d}" for i in range(classes)])

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def predict_images(self, images):
            x = decode_images(images, image_size)
            for kernel in self.kernels:
                x = tf.nn.relu(tf.nn.conv2d(x, kernel, strides=1, padding="SAME"))
            features = tf.reduce_mean(x, axis=[1, 2])
            for kernel in self.dense:
                features = tf.nn.relu(features @ kernel) + features
            return prediction_outputs(tf.nn.softmax(features @ self.head), self.synsets)

    return ConvNet()


def decode_images(images, image_size: int):
    """Encoded images (string [N]) as float32 [N, S, S, 3] in [-1, 1], inside a tf.function."""
    import tensorflow as tf

    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size])
        return image / 127.5 - 1.0

    spec = tf.TensorSpec([image_size, image_size, 3])
    return tf.map_fn(decode, images, fn_output_signature=spec)


def prediction_outputs(probabilities, synsets, k: int = 5) -> dict:
    """The outputs of a `predict_images` signature from class probabilities."""
    import tensorflow as tf

    scores, indices = tf.math.top_k(probabilities, k=k)
    return {
        "probabilities": probabilities,
        "top_k_indices": indices,
        "top_k_synsets": tf.gather(synsets, indices),
        "top_k_scores": scores,
    }


# ---- hostile images: small files declaring huge pixel counts -------------------------------


def png_bomb(side: int) -> bytes:
    """A real, valid side x side RGB PNG of zeros (~3 KB per 1000 px of side, decodes fully)."""
    row = b"\x00" * (1 + 3 * side)  # filter byte + pixels
    block = row * 100
    compressor = zlib.compressobj(9)
    # After a full flush deflate restarts: the same block compresses to the same bytes.
    head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    body = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush()[:-4]
    adler = 1
    for _ in range(side // 100):
        adler = zlib.adler32(block, adler)
    data = head + body * (side // 100 - 1) + tail + struct.pack(">I", adler)

    def chunk(kind: bytes, content: bytes) -> bytes:
        crc = zlib.crc32(kind + content) & 0xFFFFFFFF
        return struct.pack(">I", len(content)) + kind + content + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose frame header is rewritten to declare width x height."""
    data = bytearray(encode_image((90, 90, 90), size=16, fmt="JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_of_frames(width: int, height: int, frames: int) -> bytes:
    """A GIF with a width x height screen and `frames` 1x1 frames (decode_gif: all at full size)."""
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    return b"GIF89a" + screen + frame * frames + b"\x3b"


def export(module, base_path: str, version: int) -> str:
    """Save `module` as <base_path>/<version> with its signatures; returns the version dir."""
    import tensorflow as tf

    path = os.path.join(base_path, str(version))
    names = ("serving_default", "predict_images", "predict_probabilities", "classify")
    names += ("regress", "spin")
    signatures = {name: getattr(module, name) for name in names if hasattr(module, name)}
    signatures.update(getattr(module, "signature_functions", {}))
    if "serving_default" not in signatures:
        signatures["serving_default"] = signatures["predict_images"]
    tf.saved_model.save(module, path, signatures=signatures)
    if "classify" in signatures:
        mark_classification_signature(path, "classify")
    return path


def export_test_models(root: str, numbers_version: int = 1) -> str:
    """Export the tiny image and numbers models, and a models.config for both; return its path."""
    # Under `root`: the tiny image model (`van`, version 1) and the numbers model (`numbers`); the
    # path returned is the config file's.
    from serving.protos import render_model_config

    export(build_tiny_model(), os.path.join(root, "van"), 1)
    export(build_numbers_model(), os.path.join(root, "numbers"), numbers_version)
    models = [(name, os.path.join(root, name)) for name in ("van", "numbers")]
    path = os.path.join(root, "models.config")
    with open(path, "w") as config:
        config.write(render_model_config(models))
    return path


def write_warmup(
    version_dir: str,
    images: list[bytes],
    model_name: str = "van",
    signatures: tuple[str, ...] = ("predict_images",),
) -> str:
    """Write assets.extra/tf_serving_warmup_requests: one request per image and signature."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for image, signature in ((i, s) for s in signatures for i in images):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            request.inputs["images"].CopyFrom(tf.make_tensor_proto([image]))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path
