"""gRPC PredictionService and ModelService servicers built on the stock tensorflow_serving stubs."""

from __future__ import annotations

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
from serving.errors import ServingError

log = logging.getLogger(__name__)


def _rpc(api: str):
    """Turn ServingErrors into gRPC statuses, count the call, and never let a request crash."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, request, context):
            start = time.perf_counter()
            status = "OK"
            try:
                return method(self, request, context, _deadline(context))
            except ServingError as exc:
                status = exc.code.name
                context.abort(exc.code, exc.message)
            except Exception as exc:  # a bug must surface as INTERNAL, not kill the server
                log.exception("%s failed", api)
                status = "INTERNAL"
                context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            finally:
                name = getattr(getattr(request, "model_spec", None), "name", "")
                self.metrics.record(name, api, "GRPC", status, time.perf_counter() - start)

        return wrapper

    return decorate


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService."""

    def __init__(self, manager, metrics):
        self.manager = manager
        self.metrics = metrics

    @_rpc("predict")
    def Predict(self, request, context, timeout):
        return handlers.predict(self.manager, request, timeout)

    @_rpc("classify")
    def Classify(self, request, context, timeout):
        return handlers.classify(self.manager, request, timeout)

    @_rpc("get_model_metadata")
    def GetModelMetadata(self, request, context, timeout):
        return handlers.metadata(self.manager, request)

    @_rpc("regress")
    def Regress(self, request, context, timeout):
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "Regress is not supported by van-tfx")

    @_rpc("multi_inference")
    def MultiInference(self, request, context, timeout):
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported by van-tfx"
        )


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService."""

    def __init__(self, manager, metrics):
        self.manager = manager
        self.metrics = metrics

    @_rpc("get_model_status")
    def GetModelStatus(self, request, context, timeout):
        return handlers.status(self.manager, request)

    @_rpc("reload_config")
    def HandleReloadConfigRequest(self, request, context, timeout):
        config = request.config
        if config.WhichOneof("config") != "model_config_list":
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "ModelServerConfig must hold a model_config_list"
            )
        self.manager.reload(list(config.model_config_list.config))
        return model_management_pb2.ReloadConfigResponse()


def add_services(server, manager, metrics) -> None:
    """Register both services on a grpc.Server."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, metrics), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(manager, metrics), server
    )
