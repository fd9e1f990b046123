"""Server-side batching: merged runs, correct splits, isolation of bad requests, full queues."""

import threading

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import testing
from serving.batching import Batcher
from serving.errors import ServingError
from serving.protos import BatchingSettings, render_batching
from serving.server import ModelServer, ServerOptions

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    testing.export(testing.build_tiny_model(), str(root / "van"), 1)
    params = root / "batching.config"
    settings = BatchingSettings(
        max_batch_size=8, batch_timeout_micros=200_000, max_enqueued_batches=4, num_batch_threads=1
    )
    params.write_text(render_batching(settings))
    options = ServerOptions(
        model_name="van",
        model_base_path=str(root / "van"),
        port=0,
        rest_api_port=0,
        enable_batching=True,
        batching_parameters_file=str(params),
    )
    with ModelServer(options) as running:
        yield running


def request_for(images):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "van"
    request.model_spec.signature_name = "predict_images"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def call_concurrently(server, requests):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(server.grpc_target)
    )
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(i):
        barrier.wait()
        try:
            results[i] = stub.Predict(requests[i], timeout=60)
        except grpc.RpcError as err:
            results[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_requests_are_merged_and_split_back_correctly(server):
    batcher_before = server.manager.resolve("van").batchers().get("predict_images")
    runs_before = batcher_before.batches_run if batcher_before else 0
    requests = [request_for([testing.encode_image(c)] * (1 + i % 2)) for i, c in enumerate(COLOURS)]
    results = call_concurrently(server, requests)
    for colour, request, response in zip(COLOURS, requests, results, strict=True):
        assert isinstance(response, predict_pb2.PredictResponse), response
        rows = len(request.inputs["images"].string_val)
        expected = testing.expected_probabilities(np.array([colour] * rows) / 255.0)
        np.testing.assert_allclose(
            tf.make_ndarray(response.outputs["probabilities"]), expected, atol=1e-5
        )
    batcher = server.manager.resolve("van").batchers()["predict_images"]
    assert batcher.batches_run - runs_before < len(requests)  # some requests shared a run


def test_a_bad_request_does_not_fail_its_batch_neighbours(server):
    requests = [request_for([testing.encode_image(c)]) for c in COLOURS[:3]]
    requests.append(request_for([b"definitely not a png"]))
    results = call_concurrently(server, requests)
    assert all(isinstance(r, predict_pb2.PredictResponse) for r in results[:3])
    assert results[3].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in results[3].details().lower()


def test_task_larger_than_max_batch_size_is_invalid_argument(server):
    results = call_concurrently(server, [request_for([testing.encode_image(COLOURS[0])] * 9)])
    assert results[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "larger than maximum input batch size 8" in results[0].details()


def held_batcher(max_batch_size, max_enqueued_batches, batch_timeout_micros=0):
    """A one-thread Batcher whose runs (x -> 2x) wait for `release`; `started` marks the first."""
    started, release = threading.Event(), threading.Event()

    def slow_run(inputs):
        started.set()
        release.wait(30)
        return {"y": inputs["x"] * 2}

    settings = BatchingSettings(
        max_batch_size=max_batch_size, batch_timeout_micros=batch_timeout_micros,
        max_enqueued_batches=max_enqueued_batches, num_batch_threads=1,
    )  # fmt: skip
    return Batcher(slow_run, settings, "test"), started, release


def submit_in_background(batcher, rows):
    """Submit `rows` ones from a thread; returns the thread and a dict that receives the result."""
    result = {}

    def submit():
        result["outputs"] = batcher.submit({"x": np.ones(rows)}, timeout=30)

    thread = threading.Thread(target=submit)
    thread.start()
    return thread, result


def wait_until_queued(batcher, rows):
    """Block until `rows` rows wait in the batcher's queue."""
    while batcher._queued_rows < rows:  # noqa: SLF001
        threading.Event().wait(0.01)


def test_full_queue_is_unavailable():
    batcher, started, release = held_batcher(max_batch_size=2, max_enqueued_batches=1)
    running, _ = submit_in_background(batcher, 1)
    assert started.wait(30)  # the only worker is busy with the first task
    queued, queued_result = submit_in_background(batcher, 2)
    wait_until_queued(batcher, 2)
    with pytest.raises(ServingError) as err:
        batcher.submit({"x": np.ones(1)})
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert err.value.http_status == 503
    release.set()
    running.join()
    queued.join()
    batcher.stop()
    np.testing.assert_array_equal(queued_result["outputs"]["y"], [2.0, 2.0])


def test_event_loop_callers_share_batches_and_abandoned_calls_cost_no_model_time():
    import asyncio

    release = threading.Event()
    seen_rows = []

    def run(inputs):
        seen_rows.append(len(inputs["x"]))
        release.wait(30)
        return {"y": inputs["x"] * 2}

    settings = BatchingSettings(
        max_batch_size=4, batch_timeout_micros=0, max_enqueued_batches=10, num_batch_threads=1
    )
    batcher = Batcher(run, settings, "test")

    async def scenario():
        first = batcher.submit_async({"x": np.array([1.0])})
        while not seen_rows:  # the worker is now busy with `first`
            await asyncio.sleep(0.01)
        abandoned = batcher.submit_async({"x": np.array([5.0])})
        kept = [batcher.submit_async({"x": np.array([float(i)])}) for i in (2, 3)]
        abandoned.cancel()  # what grpc.aio does to a handler whose deadline passed
        release.set()
        return await first, await asyncio.gather(*kept)

    first, kept = asyncio.run(scenario())
    batcher.stop()
    assert first["y"].tolist() == [2.0]
    assert [k["y"].tolist() for k in kept] == [[4.0], [6.0]]
    assert seen_rows == [1, 2]  # the two kept calls ran as one batch; the abandoned one never ran
    assert batcher.tasks_abandoned == 1


def test_queue_limit_counts_batches_as_tf_serving_packs_them():
    batcher, started, release = held_batcher(
        max_batch_size=4, max_enqueued_batches=2, batch_timeout_micros=10_000_000
    )
    # A full batch first: the worker takes it and blocks in its run.
    threads = [submit_in_background(batcher, 4)[0]]
    assert started.wait(30)
    for rows in (3, 3, 1):  # packed in order: [3], [3, 1] - two enqueued batches, 7 of 8 rows
        threads.append(submit_in_background(batcher, rows)[0])
    wait_until_queued(batcher, 7)
    # One row would still fit by count (8 <= 2 x 4), but it needs a third batch.
    with pytest.raises(ServingError) as err:
        batcher.submit({"x": np.ones(1)})
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    release.set()
    for thread in threads:
        thread.join(30)
    batcher.stop()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "Batching Run() must have at least one input tensor"),
        ({"x": np.float32(1), "y": np.ones(2)}, "Batching Run() input tensors must have at least one dimension"),
        ({"x": np.ones(2), "y": np.ones(3)}, "Batching Run() input tensors must have equal 0th-dimension size"),
    ],
    ids=["none", "scalar", "unequal"],
)  # fmt: skip
def test_inputs_that_cannot_batch_get_tf_serving_messages(inputs, message):
    # batching_util.h ComputeTensorBatchSize; a scalar got the "equal size" message before.
    batcher = Batcher(lambda feed: feed, BatchingSettings(max_batch_size=8), "test")
    with pytest.raises(ServingError) as err:
        batcher.submit(inputs)
    batcher.stop()
    assert (err.value.code, err.value.message) == (grpc.StatusCode.INVALID_ARGUMENT, message)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (lambda x: np.float32(x.sum()), "Batched output tensor has 0 dimensions"),
        (lambda x: np.arange(10.0), "Batched output tensor's 0th dimension does not equal the sum of "
                                    "the 0th dimension sizes of the input tensors"),
    ],
    ids=["scalar", "not-per-row"],
)  # fmt: skip
@pytest.mark.parametrize("requests", [1, 3])
def test_outputs_that_cannot_be_split_fail_every_request_of_the_batch(output, message, requests):
    # batching_session.cc SplitOutputTensors. Before, each request got the whole tensor, so a
    # request could see what its batch neighbours were answered.
    settings = BatchingSettings(max_batch_size=8, batch_timeout_micros=300_000, num_batch_threads=1)
    batcher = Batcher(lambda feed: {"y": output(feed["x"])}, settings, "test")
    errors = []

    def submit(i):
        try:
            batcher.submit({"x": np.array([float(i)])})
        except ServingError as error:
            errors.append((error.code, error.message))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.stop()
    assert errors == [(grpc.StatusCode.FAILED_PRECONDITION, message)] * requests
