"""The text-proto config files TF Serving reads, parsed for the local server and rendered for
production from the same code: model config list, batching parameters, monitoring config.

`tensorflow-serving-api` ships `ModelServerConfig` but not `BatchingParameters` (it lives in
session_bundle_config.proto) nor `MonitoringConfig`, so those two are declared here with the
same field names, which is all the text format depends on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, text_format, wrappers_pb2
from google.protobuf import message_factory as _message_factory
from tensorflow_serving.config import model_server_config_pb2

from serving.files import FileTooLargeError, read_bounded

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


def _declare_messages():
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="van_tfx/serving_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    F = descriptor_pb2.FieldDescriptorProto
    batching = file.message_type.add(name="BatchingParameters")
    wrapped = [
        ("max_batch_size", ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", ".google.protobuf.Int64Value"),
        ("num_batch_threads", ".google.protobuf.Int64Value"),
        ("thread_pool_name", ".google.protobuf.StringValue"),
    ]
    for number, (name, type_name) in enumerate(wrapped, start=1):
        batching.field.add(
            name=name,
            number=number,
            type=F.TYPE_MESSAGE,
            type_name=type_name,
            label=F.LABEL_OPTIONAL,
        )
    batching.field.add(
        name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED
    )
    batching.field.add(
        name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL
    )
    prometheus = file.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    monitoring = file.message_type.add(name="MonitoringConfig")
    monitoring.field.add(
        name="prometheus_config",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".tensorflow.serving.PrometheusConfig",
    )
    pool.Add(file)
    factory = _message_factory.MessageFactory(pool)
    get = factory.GetPrototype
    return (
        get(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")),
        get(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")),
    )


BatchingParameters, MonitoringConfig = _declare_messages()
ModelServerConfig = model_server_config_pb2.ModelServerConfig
ModelConfig = model_server_config_pb2.ModelConfig


class ConfigFileError(ValueError):
    """A config file that is missing or is not the text proto it should be."""


# TF Serving's config files are a few KB; a larger one is not a config (and Python's text
# parser needs ~2.5x the file in memory: a 1.5 GB file of NULs held 3.6 GB, then MemoryError).
MAX_CONFIG_FILE_BYTES = 4 << 20
# protobuf's default recursion limit for parsing; Python's text parser recurses per level and
# a config nesting Any messages 100k deep ended in RecursionError, a traceback.
MAX_TEXT_PROTO_DEPTH = 100
_SHOWN_ERROR_CHARS = 500  # a ParseError quotes the whole current line, which may be megabytes


def parse_text_proto(path: str | Path, message_class):
    """Parse a text-proto file into `message_class`, naming the file on error."""
    name = message_class.DESCRIPTOR.name
    try:
        data = read_bounded(path, MAX_CONFIG_FILE_BYTES, "config file")
    except FileTooLargeError as exc:
        raise ConfigFileError(str(exc)) from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            f"{path} is not a valid {name} text proto: byte {exc.start} is not UTF-8"
        ) from None
    try:
        _check_depth(text)
        return text_format.Parse(text, message_class())
    except text_format.ParseError as exc:
        raise ConfigFileError(
            f"{path} is not a valid {name} text proto: {_shortened(str(exc))}"
        ) from exc


def _check_depth(text: str) -> None:
    """ParseError when messages nest deeper than MAX_TEXT_PROTO_DEPTH (strings and comments are
    skipped by protobuf's own tokenizer, so a brace inside them does not count)."""
    tokenizer = text_format.Tokenizer(text.split("\n"))
    depth = 0
    while not tokenizer.AtEnd():
        token = tokenizer.token
        if token in ("{", "<"):
            depth += 1
            if depth > MAX_TEXT_PROTO_DEPTH:
                raise tokenizer.ParseError(
                    f"Message is too deep: more than {MAX_TEXT_PROTO_DEPTH} nested levels"
                )
        elif token in ("}", ">"):
            depth -= 1
        tokenizer.NextToken()


def _shortened(text: str, limit: int = _SHOWN_ERROR_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]} ... ({len(text) - 2 * half} characters) ... {text[-half:]}"


def parse_model_config_file(path: str | Path) -> list:
    """Read --model_config_file: the ModelConfig entries of its model_config_list."""
    config = parse_text_proto(path, ModelServerConfig)
    if config.WhichOneof("config") != "model_config_list":
        raise ConfigFileError(f"{path} must hold a model_config_list")
    return list(config.model_config_list.config)


def parse_batching_file(path: str | Path) -> BatchingSettings:
    """Read --batching_parameters_file into BatchingSettings (unset fields keep TF defaults)."""
    params = parse_text_proto(path, BatchingParameters)
    defaults = BatchingSettings.tf_serving_defaults()
    max_batch_size = _value(params, "max_batch_size", defaults.max_batch_size)
    # WrapSessionForBatching (bundle_factory_util.cc) fails every version's load with this; the
    # batcher here does not pad, so a mismatch would otherwise be served without a word.
    allowed = params.allowed_batch_sizes
    if allowed and allowed[-1] != max_batch_size:
        raise ConfigFileError(
            f"{path}: Last entry in allowed_batch_sizes must match max_batch_size; last entry "
            f"was {allowed[-1]}; expected {max_batch_size}"
        )
    return BatchingSettings(
        max_batch_size=max_batch_size,
        batch_timeout_micros=_value(params, "batch_timeout_micros", defaults.batch_timeout_micros),
        max_enqueued_batches=_value(params, "max_enqueued_batches", defaults.max_enqueued_batches),
        num_batch_threads=_value(params, "num_batch_threads", defaults.num_batch_threads),
    )


def parse_monitoring_file(path: str | Path) -> str | None:
    """Read --monitoring_config_file: the Prometheus path when enabled, else None."""
    config = parse_text_proto(path, MonitoringConfig)
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or DEFAULT_PROMETHEUS_PATH


def _value(params, field: str, default: int) -> int:
    return getattr(params, field).value if params.HasField(field) else default


@dataclasses.dataclass(frozen=True)
class BatchingSettings:
    """The BatchingParameters the server's batcher honours."""

    max_batch_size: int = 32
    batch_timeout_micros: int = 2000
    max_enqueued_batches: int = 100
    num_batch_threads: int = 2

    @classmethod
    def tf_serving_defaults(cls) -> BatchingSettings:
        """TF Serving's defaults for fields a batching file leaves unset."""
        return cls(
            max_batch_size=1000,
            batch_timeout_micros=0,
            max_enqueued_batches=10,
            num_batch_threads=4,
        )

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < (0 if field.name == "batch_timeout_micros" else 1):
                raise ConfigFileError(f"batching {field.name} must be positive")


def render_model_config(models: list[tuple[str, str]], num_versions: int = 1, labels=None) -> str:
    """Render a model_config_list text proto for (name, base_path) pairs."""
    config = ModelServerConfig()
    for name, base_path in models:
        entry = config.model_config_list.config.add(
            name=name, base_path=base_path, model_platform="tensorflow"
        )
        entry.model_version_policy.latest.num_versions = num_versions
        for label, version in (labels or {}).items():
            entry.version_labels[label] = version
    return text_format.MessageToString(config)


def render_batching(settings: BatchingSettings) -> str:
    """Render a BatchingParameters text proto."""
    params = BatchingParameters()
    params.max_batch_size.value = settings.max_batch_size
    params.batch_timeout_micros.value = settings.batch_timeout_micros
    params.max_enqueued_batches.value = settings.max_enqueued_batches
    params.num_batch_threads.value = settings.num_batch_threads
    return text_format.MessageToString(params)


def render_monitoring(path: str = DEFAULT_PROMETHEUS_PATH) -> str:
    """Render a MonitoringConfig text proto with Prometheus enabled at `path`."""
    config = MonitoringConfig()
    config.prometheus_config.enable = True
    config.prometheus_config.path = path
    return text_format.MessageToString(config)
