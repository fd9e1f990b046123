"""gRPC PredictionService and ModelService (grpc.aio), wire-compatible with the stock
tensorflow_serving stubs.

Handlers run on the server's event loop; model calls leave it (the batch queue, or `executor` when
batching is off), so the loop keeps accepting and answering requests while models run. Every RPC
takes and returns bytes: a request larger than LIGHT_BYTES is parsed, checked and answered on
`executor`, so nothing proportional to a request's size runs on the loop (grpc.aio would parse it
there). Deadlines need no timer here: grpc.aio cancels a handler when its client's deadline passes
(the client sees DEADLINE_EXCEEDED), and the batcher skips queued requests whose caller is gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2,
    prediction_service_pb2,
    regression_pb2,
)

from serving import handlers
from serving.errors import ServingError, capped_message
from serving.grpc_wire import PredictRequestEntries, parse_gently
from serving.servable import LIGHT_BYTES, off_the_loop_unless

log = logging.getLogger(__name__)


def _rpc(api: str | None, request_class):
    """Read the request from its bytes, turn ServingErrors into gRPC statuses, count the call
    (`api` None: uncounted, as in prediction_service_impl.cc), and never let a request crash."""

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, raw: bytes, context):
            start = time.perf_counter()
            status = "OK"
            request, counted = None, api
            # The only per-request fact known before any work: a request's bytes bound what
            # reading and checking it costs, so larger ones are handled off the event loop.
            light = len(raw) <= LIGHT_BYTES
            try:
                try:
                    request = await off_the_loop_unless(
                        light, self.executor, parse_gently, request_class, raw
                    )
                except DecodeError:
                    # gRPC C++'s GenericDeserialize (proto_utils.h): INTERNAL with the message's
                    # InitializationErrorString(), empty for proto3; the service never sees it.
                    counted = None
                    raise ServingError(grpc.StatusCode.INTERNAL, "") from None
                return await method(self, request, light)
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
                if counted is not None:
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

    async def _answer(self, light: bool, handler, *args) -> bytes:
        return await off_the_loop_unless(light, self.executor, _serialized, handler, *args)


def _serialized(handler, *args) -> bytes:
    return handler(*args).SerializeToString()


class PredictionService(_Servicer):
    """tensorflow.serving.PredictionService."""

    @_rpc("Predict", PredictRequestEntries)
    async def Predict(self, request, light):
        """gRPC Predict: run the request's signature and answer its outputs."""
        return await handlers.predict_async(self.manager, request, self.executor, light)

    @_rpc("Classify", classification_pb2.ClassificationRequest)
    async def Classify(self, request, light):
        """gRPC Classify: run a classification signature on the request's tf.Examples."""
        return await handlers.classify_async(self.manager, request, self.executor, light)

    @_rpc(None, get_model_metadata_pb2.GetModelMetadataRequest)
    async def GetModelMetadata(self, request, light):
        """gRPC GetModelMetadata: answer the model's signature_def metadata."""
        return await self._answer(light, handlers.metadata, self.manager, request)

    @_rpc("Regress", regression_pb2.RegressionRequest)
    async def Regress(self, request, light):
        """gRPC Regress: run a regression signature on the request's tf.Examples."""
        return await handlers.regress_async(self.manager, request, self.executor, light)

    @_rpc(None, inference_pb2.MultiInferenceRequest)
    async def MultiInference(self, request, light):
        """gRPC MultiInference: always UNIMPLEMENTED, as van-tfx does not support it."""
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported by van-tfx"
        )


class ModelService(_Servicer):
    """tensorflow.serving.ModelService."""

    @_rpc(None, get_model_status_pb2.GetModelStatusRequest)
    async def GetModelStatus(self, request, light):
        """gRPC GetModelStatus: answer the state of the model's versions."""
        return await self._answer(light, handlers.status, self.manager, request)

    @_rpc(None, model_management_pb2.ReloadConfigRequest)
    async def HandleReloadConfigRequest(self, request, light):
        """gRPC HandleReloadConfigRequest: load the request's model_config_list and serve it."""
        config = request.config
        if config.WhichOneof("config") != "model_config_list":  # model_service_impl.cc
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported",
            )
        # Loading models takes seconds: off the loop, so serving goes on meanwhile.
        await asyncio.get_running_loop().run_in_executor(
            self.executor, _reload, self.manager, config
        )
        response = model_management_pb2.ReloadConfigResponse()
        response.status.SetInParent()  # TF Serving always sets it: error_code OK
        return response.SerializeToString()


def _reload(manager, config) -> None:
    manager.reload(list(config.model_config_list.config))


def _handler(service, servicer) -> grpc.GenericRpcHandler:
    # Every RPC of the service, from its descriptor, takes and returns bytes: the request is
    # parsed by the RPC itself (off the loop when large), not by grpc.aio on the loop.
    methods = {
        method.name: grpc.unary_unary_rpc_method_handler(getattr(servicer, method.name))
        for method in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, methods)


def add_services(server, manager, metrics, executor) -> None:
    """Register both services on a grpc.aio.Server; blocking work goes to `executor`."""
    services = (
        (
            prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
            PredictionService,
        ),
        (model_service_pb2.DESCRIPTOR.services_by_name["ModelService"], ModelService),
    )
    server.add_generic_rpc_handlers(
        tuple(_handler(service, kind(manager, metrics, executor)) for service, kind in services)
    )
