"""The exported graph's batch slicing and chunking (van_trainer.export.forward_in_slices,
in_chunks): same logits as the whole batch for every batch size, slice count and chunk size, empty
batches answered, not failed, chunks one after another."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from van_trainer.export import forward_in_slices, in_chunks
from van_trainer.model import build_van, fold_for_inference


@pytest.fixture(scope="module")
def folded():
    tf.keras.utils.set_random_seed(2)
    return fold_for_inference(build_van("tiny", num_classes=7, input_shape=(32, 32, 3)))


def traced_per_setting(forward):
    """forward(setting, x) traced once per setting, for any batch size (as the signatures are)."""
    cache = {}

    def traced(setting):
        if setting not in cache:
            cache[setting] = tf.function(
                lambda x: forward(setting, x), input_signature=[tf.TensorSpec([None, 32, 32, 3])]
            )
        return cache[setting]

    return traced


def assert_whole_batch_logits(folded, logits, images, batch):
    """`logits` are the folded model's on `images`, in order: [batch, 7] float32."""
    assert logits.shape == (batch, 7) and logits.dtype == np.float32
    if batch:
        expected = folded(images, training=False).numpy()
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sliced_forward(folded):
    """One traced function per slice count."""
    return traced_per_setting(lambda slices, x: forward_in_slices(folded, x, slices))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(0, 9), slices=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_sliced_logits_equal_the_whole_batch_in_order(folded, sliced_forward, batch, slices, seed):
    images = tf.random.stateless_normal([batch, 32, 32, 3], seed=[seed, 0])
    assert_whole_batch_logits(folded, sliced_forward(slices)(images).numpy(), images, batch)


def _conv_ops(function) -> int:
    graph_def = function.get_concrete_function().graph.as_graph_def()
    nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
    return sum(node.op == "Conv2D" for node in nodes)


def test_each_slice_is_its_own_model_call(sliced_forward):
    # 3 slices: the sliced branch calls the model 3 times, the whole-batch branch once more.
    assert _conv_ops(sliced_forward(3)) == 4 * _conv_ops(sliced_forward(1)) > 0


@pytest.fixture(scope="module")
def chunked_forward(folded):
    """One traced function per chunk size: 2 slices inside each chunk, as the export runs."""
    return traced_per_setting(
        lambda chunk, x: in_chunks(lambda rows: forward_in_slices(folded, rows, 2), x, chunk, 7)
    )


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(0, 11), chunk=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_chunked_logits_equal_the_whole_batch_in_order(folded, chunked_forward, batch, chunk, seed):
    images = tf.random.stateless_normal([batch, 32, 32, 3], seed=[seed, 1])
    assert_whole_batch_logits(folded, chunked_forward(chunk)(images).numpy(), images, batch)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(0, 40), chunk=st.integers(1, 12))
def test_no_chunk_holds_more_rows_than_the_chunk_size(batch, chunk):
    # Each row answers with the row count of the call that computed it.
    rows_per_call = tf.function(
        lambda x: in_chunks(
            lambda r: tf.fill([tf.shape(r)[0], 1], 1.0) * tf.cast(tf.shape(r)[0], tf.float32),
            x,
            chunk,
            1,
        ),
        input_signature=[tf.TensorSpec([None])],
    )
    seen = rows_per_call(tf.zeros([batch])).numpy()[:, 0]
    expected = [
        min(chunk, batch - start)
        for start in range(0, batch, chunk)
        for _ in range(min(chunk, batch - start))
    ]
    assert seen.tolist() == expected


def test_chunks_run_one_after_another(chunked_forward):
    # In parallel, the loop's iterations would hold every chunk's activations at once again.
    graph_def = chunked_forward(3).get_concrete_function().graph.as_graph_def()
    loops = [n for n in graph_def.node if n.op in ("While", "StatelessWhile")]
    assert len(loops) == 1
    assert loops[0].attr["parallel_iterations"].i == 1
