"""The exported graph's batch slicing (van_trainer.export.forward_in_slices): same logits as the
whole batch for every batch size and slice count, empty batches answered, not failed."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from van_trainer.export import forward_in_slices
from van_trainer.model import build_van, fold_for_inference


@pytest.fixture(scope="module")
def folded():
    tf.keras.utils.set_random_seed(2)
    return fold_for_inference(build_van("tiny", num_classes=7, input_shape=(32, 32, 3)))


@pytest.fixture(scope="module")
def sliced_forward(folded):
    """One traced function per slice count, for any batch size (as the signatures are)."""
    cache = {}

    def forward(slices):
        if slices not in cache:
            cache[slices] = tf.function(
                lambda x: forward_in_slices(folded, x, slices),
                input_signature=[tf.TensorSpec([None, 32, 32, 3])],
            )
        return cache[slices]

    return forward


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(0, 9), slices=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_sliced_logits_equal_the_whole_batch_in_order(folded, sliced_forward, batch, slices, seed):
    images = tf.random.stateless_normal([batch, 32, 32, 3], seed=[seed, 0])
    logits = sliced_forward(slices)(images).numpy()
    assert logits.shape == (batch, 7) and logits.dtype == np.float32
    if batch:
        expected = folded(images, training=False).numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def _conv_ops(function) -> int:
    graph_def = function.get_concrete_function().graph.as_graph_def()
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    return sum(node.op == "Conv2D" for node in nodes)


def test_each_slice_is_its_own_model_call(sliced_forward):
    # 3 slices: the sliced branch calls the model 3 times, the whole-batch branch once more.
    assert _conv_ops(sliced_forward(3)) == 4 * _conv_ops(sliced_forward(1)) > 0
