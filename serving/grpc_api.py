"""gRPC PredictionService and ModelService servicers (grpc.aio) on the stock tensorflow_serving
stubs.

Handlers run on the server's event loop; model calls leave it (the batch queue, or `executor` when
batching is off), so the loop keeps accepting and answering requests while models run. Deadlines
need no timer here: grpc.aio cancels a handler when its client's deadline passes (the client sees
DEADLINE_EXCEEDED), and the batcher skips queued requests whose caller is gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from serving import handlers
from serving.errors import ServingError, capped_message

log = logging.getLogger(__name__)


def _rpc(api: str | None):
    """Turn ServingErrors into gRPC statuses, count the call (`api` None: uncounted, as in
    prediction_service_impl.cc), and never let a request crash."""

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, request, context):
            start = time.perf_counter()
            status = "OK"
            try:
                return await method(self, request, context)
            except ServingError as exc:
                status = exc.code.name
                await context.abort(exc.code, exc.message)
            except asyncio.CancelledError:  # the client went away or its deadline passed
                status = "CANCELLED"
                raise
            except Exception as exc:  # a bug must surface as INTERNAL, not kill the server
                log.exception("%s failed", api)
                status = "INTERNAL"
                message = capped_message(f"{type(exc).__name__}: {exc}")
                await context.abort(grpc.StatusCode.INTERNAL, message)
            finally:
                if api is not None:
                    name = getattr(getattr(request, "model_spec", None), "name", "")
                    self.metrics.record(name, api, "GRPC", status, time.perf_counter() - start)

        return wrapper

    return decorate


class _Servicer:
    """What every RPC here works with: the models, the metrics, and threads for blocking work."""

    def __init__(self, manager, metrics, executor):
        self.manager = manager
        self.metrics = metrics
        self.executor = executor


class PredictionService(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService."""

    @_rpc("Predict")
    async def Predict(self, request, context):
        return await handlers.predict_async(self.manager, request, self.executor)

    @_rpc("Classify")
    async def Classify(self, request, context):
        return await handlers.classify_async(self.manager, request, self.executor)

    @_rpc(None)
    async def GetModelMetadata(self, request, context):
        return handlers.metadata(self.manager, request)

    @_rpc("Regress")
    async def Regress(self, request, context):
        return await handlers.regress_async(self.manager, request, self.executor)

    @_rpc(None)
    async def MultiInference(self, request, context):
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported by van-tfx"
        )


class ModelService(_Servicer, model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService."""

    @_rpc(None)
    async def GetModelStatus(self, request, context):
        return handlers.status(self.manager, request)

    @_rpc(None)
    async def HandleReloadConfigRequest(self, request, context):
        config = request.config
        if config.WhichOneof("config") != "model_config_list":  # model_service_impl.cc
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported",
            )
        # Loading models takes seconds: off the loop, so serving goes on meanwhile.
        configs = list(config.model_config_list.config)
        await asyncio.get_running_loop().run_in_executor(
            self.executor, self.manager.reload, configs
        )
        response = model_management_pb2.ReloadConfigResponse()
        response.status.SetInParent()  # TF Serving always sets it: error_code OK
        return response


def add_services(server, manager, metrics, executor) -> None:
    """Register both services on a grpc.aio.Server; blocking work goes to `executor`."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, metrics, executor), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(manager, metrics, executor), server
    )
