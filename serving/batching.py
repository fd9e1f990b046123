"""A shared batcher per servable signature: concurrent requests' tensors are merged along dim 0,
run once, and split back, like TF Serving's BasicBatchScheduler.

Requests arrive either from threads (REST, warmup: `submit` blocks) or from the gRPC event loop
(`submit_async` returns an asyncio future). A finished batch wakes each waiting thread, but an
event loop only once per batch: under load that one wake-up instead of one per request is most of
what makes batching pay off in a Python server (see docs/serving.md, "Performance").
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np

from serving.errors import ServingError, failed_precondition, invalid_argument, unavailable
from serving.protos import BatchingSettings

Tensors = dict[str, np.ndarray]
MAX_WAIT_SECONDS = 3600.0  # one Condition.wait of a batch timeout (the loop waits again)


class _Task:
    def __init__(self, inputs: Tensors, rows: int, future: asyncio.Future | None = None):
        self.inputs = inputs
        self.rows = rows
        self.enqueued = time.monotonic()
        self.future = future  # set for event-loop callers, None for threads
        self.done = threading.Event()
        self.result: Tensors | None = None
        self.error: Exception | None = None

    def finish(self, result: Tensors | None = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error


class Batcher:
    """Merge concurrent calls of `run` into batches of at most `max_batch_size` rows."""

    def __init__(self, run: Callable[[Tensors], Tensors], settings: BatchingSettings, name: str):
        self._run = run
        self._settings = settings
        self._queue: collections.deque[_Task] = collections.deque()
        self._queued_rows = 0
        self._enqueued_batches = 1
        self._tail_rows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self.batches_run = 0  # how many merged runs happened (observability, tests)
        self.tasks_run = 0
        self.tasks_abandoned = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{name}-{i}", daemon=True)
            for i in range(settings.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: Tensors, timeout: float | None = None) -> Tensors:
        """Run `inputs` as part of a batch; blocks until its slice of the result is ready."""
        task = _Task(inputs, self._checked_rows(inputs))
        if not self._enqueue(task):  # the servable is being unloaded: finish in-flight work here
            return self._run(inputs)
        if not task.done.wait(timeout):
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline exceeded")
        if task.error is not None:
            raise task.error
        return task.result

    def submit_async(self, inputs: Tensors) -> asyncio.Future:
        """Queue `inputs` from a running event loop; the future resolves to its result slice."""
        loop = asyncio.get_running_loop()
        task = _Task(inputs, self._checked_rows(inputs), loop.create_future())
        if not self._enqueue(task):
            return loop.run_in_executor(None, self._run, inputs)
        return task.future

    def _checked_rows(self, inputs: Tensors) -> int:
        rows = _batch_rows(inputs)
        limit = self._settings.max_batch_size
        if rows > limit:
            raise invalid_argument(
                f"Task size {rows} is larger than maximum input batch size {limit}"
            )
        return rows

    def _enqueue(self, task: _Task) -> bool:
        """Queue the task (False when stopping); UNAVAILABLE when the queue is full."""
        limit = self._settings.max_batch_size
        with self._cond:
            if self._stopping:
                return False
            # TF Serving's rule: a task that does not fit the open (last) batch starts a new one,
            # and a new batch beyond max_enqueued_batches is refused.
            if self._tail_rows + task.rows > limit:
                if self._enqueued_batches >= self._settings.max_enqueued_batches:
                    raise unavailable(
                        "The batch scheduling queue to which this task was submitted is full"
                    )
                self._enqueued_batches += 1
                self._tail_rows = 0
            self._tail_rows += task.rows
            self._queue.append(task)
            self._queued_rows += task.rows
            self._cond.notify()
        return True

    def _recount(self) -> None:
        # Rows, and the queue as TF Serving's scheduler would hold it: tasks packed in order into
        # batches. Kept up to date by _enqueue; rebuilt here after tasks leave the queue.
        batches, tail = 1, 0  # there is always an open batch, possibly empty
        for task in self._queue:
            if tail + task.rows > self._settings.max_batch_size:
                batches, tail = batches + 1, 0
            tail += task.rows
        self._enqueued_batches, self._tail_rows = batches, tail
        self._queued_rows = sum(task.rows for task in self._queue)

    def stop(self) -> None:
        """Let the workers drain the queue, then end them."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _next_batch(self) -> list[_Task] | None:
        timeout = self._settings.batch_timeout_micros / 1e6
        with self._cond:
            while True:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                wait = self._queue[0].enqueued + timeout - time.monotonic()
                full = self._queued_rows >= self._settings.max_batch_size
                if full or wait <= 0 or self._stopping:
                    return self._take_batch()
                # batch_timeout_micros is an int64 from the batching file: past TIMEOUT_MAX
                # (~292 years) Condition.wait raised OverflowError and the worker thread died,
                # one per request, until none was left. Longer waits are taken in steps.
                self._cond.wait(min(wait, MAX_WAIT_SECONDS))

    def _take_batch(self) -> list[_Task]:
        self._drop_abandoned()
        batch, rows = [], 0
        limit = self._settings.max_batch_size
        while self._queue and rows + self._queue[0].rows <= limit:
            if batch and not _compatible(batch[0], self._queue[0]):
                break
            task = self._queue.popleft()
            batch.append(task)
            rows += task.rows
        self._recount()
        return batch

    def _drop_abandoned(self) -> None:
        # A caller whose deadline passed (its future was cancelled) costs no model time.
        if any(task.future is not None and task.future.cancelled() for task in self._queue):
            kept = [t for t in self._queue if t.future is None or not t.future.cancelled()]
            self.tasks_abandoned += len(self._queue) - len(kept)
            self._queue = collections.deque(kept)

    def _execute(self, batch: list[_Task]) -> None:
        self.batches_run += 1
        self.tasks_run += len(batch)
        self._compute(batch)
        _deliver(batch)

    def _compute(self, batch: list[_Task]) -> None:
        if len(batch) == 1:
            self._execute_alone(batch[0])
            return
        merged = {
            name: np.concatenate([task.inputs[name] for task in batch]) for name in batch[0].inputs
        }
        try:
            outputs = self._run(merged)
        except Exception:
            # One bad request (say an undecodable image) must not fail its batch neighbours.
            for task in batch:
                self._execute_alone(task)
            return
        try:
            _checked_outputs(outputs, sum(task.rows for task in batch))
        except ServingError as error:
            for task in batch:
                task.finish(error=error)
            return
        start = 0
        for task in batch:
            task.finish(
                result={name: value[start : start + task.rows] for name, value in outputs.items()}
            )
            start += task.rows

    def _execute_alone(self, task: _Task) -> None:
        try:
            task.finish(result=_checked_outputs(self._run(task.inputs), task.rows))
        except Exception as exc:  # handed to the waiting request thread
            task.finish(error=exc)


def _deliver(batch: list[_Task]) -> None:
    """Wake every waiting thread, and each event loop once for all of its tasks."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Task]] = {}
    for task in batch:
        if task.future is None:
            task.done.set()
        else:
            by_loop.setdefault(task.future.get_loop(), []).append(task)
    for loop, tasks in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_futures, tasks)
        except RuntimeError:  # that loop is closed: its server stopped, nobody is waiting
            pass


def _resolve_futures(tasks: list[_Task]) -> None:
    for task in tasks:
        if task.future.done():  # the caller gave up (deadline, cancelled RPC)
            continue
        if task.error is not None:
            task.future.set_exception(task.error)
        else:
            task.future.set_result(task.result)


def _batch_rows(inputs: Tensors) -> int:
    # batching_util.h ComputeTensorBatchSize, its checks in its order.
    if not inputs:
        raise invalid_argument("Batching Run() must have at least one input tensor")
    if any(value.ndim == 0 for value in inputs.values()):
        raise invalid_argument("Batching Run() input tensors must have at least one dimension")
    sizes = {value.shape[0] for value in inputs.values()}
    if len(sizes) != 1:
        raise invalid_argument("Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


def _checked_outputs(outputs: Tensors, rows: int) -> Tensors:
    """`outputs` if each has `rows` rows to split among the batch's requests, else
    FAILED_PRECONDITION as batching_session.cc SplitOutputTensors (a whole-batch tensor
    handed to every request would show each one the others' answers)."""
    for value in outputs.values():
        if value.ndim == 0:
            raise failed_precondition("Batched output tensor has 0 dimensions")
        if value.shape[0] != rows:
            raise failed_precondition(
                "Batched output tensor's 0th dimension does not equal the sum of the "
                "0th dimension sizes of the input tensors"
            )
    return outputs


def _compatible(first: _Task, other: _Task) -> bool:
    if first.inputs.keys() != other.inputs.keys():
        return False
    return all(
        first.inputs[k].shape[1:] == other.inputs[k].shape[1:]
        and first.inputs[k].dtype == other.inputs[k].dtype
        for k in first.inputs
    )
