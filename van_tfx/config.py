"""The one typed configuration of van-tfx: every default lives here, every stage reads from it.

A `Config` is loaded from YAML (`$VAN_TFX_HOME/config.yaml` or `--config FILE`), overridden from the
CLI with dotted keys (`--set train.epochs=3`), validated by pydantic, and handed to each stage as
the section it needs (TFX components receive `section.model_dump()` through `custom_config`).
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from van_tfx.env import van_tfx_home
from van_tfx.storage import write_local_text


class _Section(BaseModel):
    # Unknown keys are typos in user YAML; reject them instead of ignoring them. Numbers must be
    # finite: an `inf` learning rate or step count is a typo too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic's lax mode reads `yes`/`true` as 1 and "3" or 3.0 as 3; for a number field
        # that is a mistake to report, not a value to guess. Ints still fill float fields.
        annotation = cls.model_fields[info.field_name].annotation
        kinds = typing.get_args(annotation) if typing.get_origin(annotation) is tuple else ()
        if annotation in (int, float):
            _check_number(value, annotation)
        elif kinds and isinstance(value, list | tuple):
            for kind, item in zip(kinds, value, strict=False):
                if kind in (int, float):
                    _check_number(item, kind)
        return value


# Values quoted in errors are abbreviated: a YAML alias bomb (lists of lists of the same list) in
# a number field is tiny as nodes but gigabytes as text. reprlib's own default still makes 6**6.
_BRIEF = reprlib.Repr()
_GLOB_CHARS = ("*", "?", "[", "]")
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 2, 60, 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 4


def _check_number(value: Any, kind: type) -> None:
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        got = _BRIEF.repr(value)
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {got}")
    # Integers reach TensorFlow (seeds, steps, sizes) as int64 at most; past that the error
    # would come from deep inside a run ("Python int too large to convert to C long").
    if kind is int and not -(2**63) <= value < 2**63:
        raise ValueError(
            f"expected an integer within int64 (-2**63 <= n < 2**63), got {_BRIEF.repr(value)}"
        )


def _check_range(value: tuple[float, float], high: float | None, what: str) -> None:
    """Refuse a [lower, upper] pair unless 0 < lower <= upper (<= high)."""
    lower, upper = value
    if 0 < lower <= upper and (high is None or upper <= high):
        return
    cap = f" <= {high:g}" if high is not None else ""
    raise ValueError(
        f"must be [lower, upper] {what} with 0 < lower <= upper{cap}, got [{lower:g}, {upper:g}]"
    )


class DataConfig(_Section):
    """Where the ImageNet-style TFRecords are and how Transform stores images."""

    root: str = Field("", description="Data directory; empty means $VAN_TFX_HOME/data.")

    @field_validator("root")
    @classmethod
    def _root_is_no_glob(cls, root: str) -> str:
        # TFX globs the split patterns joined to the root: `data [v1]` matched nothing ("Cannot
        # find matching for split train") without naming the root as the cause.
        if any(char in root for char in _GLOB_CHARS):
            raise ValueError(
                f"must not contain glob characters ({' '.join(_GLOB_CHARS)}): TFX globs the "
                f"split patterns under it; got {root!r}"
            )
        return root

    layout: Literal["spans", "plain"] = "spans"
    train_pattern: str = "span-{SPAN}/train-*"
    eval_pattern: str = "span-{SPAN}/validation-*"
    max_image_side: int = Field(
        512,
        ge=32,
        le=16384,
        description="Longer side of the JPEG Transform stores: smaller JPEGs are kept byte for "
        "byte, larger images (and PNGs) are resized to it and re-encoded.",
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="Quality of re-encoded images.")
    max_image_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Largest image (width x height, from its header) Transform decodes; a "
        "larger one stops the run naming its record (decompression bombs).",
    )
    examples_per_shard: int = Field(
        1024,
        ge=1,
        le=1 << 20,
        description="Records per transformed file (ImageNet-1k: 1,252 train files).",
    )
    schema_path: str = Field("", description="Curated schema; empty means the one in the repo.")
    num_classes: int = Field(
        0, ge=0, description="Label domain max for validation; 0 = count the data's synsets.txt."
    )


class ModelConfig(_Section):
    """Which VAN to build."""

    variant: Literal["b0", "b1", "b2", "b3", "b4", "b5", "b6", "tiny"] = "b0"
    # Bounded: the Trainer allocates image_size^2 x 3 floats per image (65536 asked for 51 GB).
    image_size: int = Field(224, ge=32, le=2048, multiple_of=32)
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    pretrained_weights: str = Field("", description="Converted official .weights.h5 to fine-tune.")


class AugmentConfig(_Section):
    """The paper's per-step training augmentation (timm 0.4.12 recipe); each part switchable."""

    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="Area fraction range of the random crop (timm: 0.08-1)."
    )
    crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="Aspect ratio (w/h) range of the random crop (timm: 3/4-4/3)."
    )
    horizontal_flip: bool = True
    randaugment: bool = True
    randaugment_num_ops: int = Field(2, ge=0, le=16)
    randaugment_magnitude: float = Field(9.0, ge=0, le=10)
    randaugment_magnitude_std: float = Field(0.5, ge=0)
    mixup_alpha: float = Field(0.8, ge=0)
    cutmix_alpha: float = Field(1.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    random_erasing_prob: float = Field(0.25, ge=0, le=1)
    color_jitter: float = Field(0.4, ge=0)

    # Validated even with random_resized_crop off, so switching it on later cannot fail late.
    # An area fraction above 1 or below 0 never fits the image, so every draw falls back to the
    # whole image and the crop is silently off; a ratio <= 0 is a math domain error in the
    # Trainer's log(ratio), after Transform has already run.
    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_is_an_area_fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        _check_range(value, 1.0, "of image area fractions")
        return value

    @field_validator("crop_ratio")
    @classmethod
    def _crop_ratio_is_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        _check_range(value, None, "of aspect ratios (width / height)")
        return value


class TrainConfig(_Section):
    """Optimisation budget and recipe (official VAN recipe defaults, scaled to the batch)."""

    epochs: int = Field(300, ge=1)
    steps_per_epoch: int = Field(0, ge=0, description="0 means one pass over the training split.")
    batch_size: int = Field(
        1024, ge=1, le=1 << 20, description="Global batch size across all replicas."
    )
    base_learning_rate: float = Field(1e-3, gt=0, description="LR at global batch 1024.")
    warmup_epochs: float = Field(5.0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    clip_grad_norm: float = Field(0.0, ge=0, description="0 disables clipping.")
    mixed_precision: Literal["none", "mixed_bfloat16", "mixed_float16"] = "none"
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0 disables the weight EMA.")
    checkpoint_every_steps: int = Field(
        1000,
        ge=1,
        description="Steps between mid-epoch checkpoints (BackupAndRestore). Each saves weights "
        "and both AdamW slots (~49 MB for b0) and pauses every worker: 1,000 steps is ~0.8 "
        "ImageNet epoch at batch 1024 (~300 saves in 300 epochs, not 7,500 at 50).",
    )
    eval_steps: int = Field(0, ge=0, description="0 means the whole validation split.")
    seed: int = 0
    deterministic: bool = False
    warm_start: bool = True
    strategy: Literal["auto", "default", "mirrored", "multi_worker"] = Field(
        "auto", description="auto: multi-worker if TF_CONFIG names >1 task, mirrored if >1 GPU."
    )
    cpu_devices: int = Field(
        0, ge=0, description="Split the CPU into N logical devices (before TF starts) for mirrored."
    )
    # Accelerator switches, off by default: on this project's CPUs XLA makes VAN's whole step many
    # times slower (GELU alone is XLA-fused, in the model) and one step per call costs nothing
    # measurable (docs/trainer.md#gpu-and-tpu-switches).
    jit_compile: bool = Field(
        False, description="XLA-compile the train step and the optimizer update (GPU/TPU)."
    )
    steps_per_execution: int = Field(
        1, ge=1, description="Train steps per compiled call; callbacks see every Nth step."
    )
    cpu_kernels: bool = Field(
        True,
        description="Train depthwise convs (and the MLP's GELU) with van_trainer.kernels' C++ "
        "ops on CPU-only hosts; stock TF ops on GPUs, under jit_compile, or where they can't load.",
    )
    shuffle_buffer: int = Field(2048, ge=1, le=1 << 24)
    log_every_steps: int = Field(10, ge=1, description="TensorBoard scalar cadence.")

    @model_validator(mode="after")
    def _schedule_is_ordered(self) -> TrainConfig:
        # A warmup as long as the run never reaches the cosine phase (the schedule clamps it to
        # the run and peaks at the last step); epochs are known here even when steps are not.
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs ({self.warmup_epochs:g}) must be shorter than train.epochs "
                f"({self.epochs}); lower train.warmup_epochs"
            )
        # Against the base rate, not the batch-scaled peak: tiny debug batches scale the peak
        # below the 1e-6 floor defaults, which is harmless, while min_lr=1 with lr=1e-3 is a typo.
        for key in ("min_lr", "warmup_lr"):
            if getattr(self, key) > self.base_learning_rate:
                raise ValueError(
                    f"train.{key} ({getattr(self, key):g}) must not exceed "
                    f"train.base_learning_rate ({self.base_learning_rate:g})"
                )
        return self


class EvalConfig(_Section):
    """The Evaluator's blessing gate and the eval-time preprocessing."""

    crop_pct: float = Field(0.9, gt=0, le=1)
    min_top1: float = Field(0.5, ge=0, le=1)
    max_top1_drop: float = Field(0.01, ge=0, le=1, description="Allowed drop vs the baseline.")
    top_k: int = Field(5, ge=1)


class ServingConfig(_Section):
    """How the pushed model is named and served."""

    model_name: str = Field("van", pattern=r"^[A-Za-z0-9_.-]+$")
    base_path: str = Field(
        "", description="Serving base path; empty means $VAN_TFX_HOME/serving/<model_name>."
    )
    grpc_port: int = Field(8500, ge=0, le=65535)
    rest_port: int = Field(8501, ge=0, le=65535)
    top_k: int = Field(5, ge=1)
    max_image_pixels: int = Field(
        25_000_000,
        ge=1,
        description="Largest image (width x height x frames) the exported graph and van-tfx serve "
        "decode; larger ones are refused before decoding.",
    )
    max_request_images: int = Field(
        1000,
        ge=1,
        description="Most images one request may send to the exported graph: each costs its "
        "decoding and a model pass however small its file (the activations are bounded by "
        "inference_chunk_images); more are refused before decoding. 1000 is what TFMA's Evaluator "
        "sends per call (tfx_bsl's batch cap): below it, the Evaluator retries refused batches "
        "one example at a time.",
    )
    max_request_pixels: int = Field(
        1_000_000_000,
        ge=1,
        description="Most pixels (width x height, summed over a request's images) the exported "
        "graph decodes for one request; more are refused before decoding.",
    )
    cpu_image: str = Field(
        "",
        description="Image of the CPU Deployments `van-tfx serving-manifests` writes; empty: the "
        "stock tensorflow/serving image, whose kernels are Eigen's, not oneDNN's (docs/serving.md).",
    )
    inference_slices: int = Field(
        2,
        ge=1,
        le=64,
        description="The exported graph cuts each batch into N parts that run concurrently (1: "
        "the whole batch at once); batches smaller than N run whole.",
    )
    inference_chunk_images: int = Field(
        32,
        ge=1,
        description="The exported graph runs a request's images through the model N at a time, "
        "one chunk after another (each chunk in inference_slices slices): a request's memory is "
        "N images' activations (VAN-b0: ~9.6 MB an image), whatever its image count.",
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> ServingConfig:
        # 0 lets the server pick a free port, so two zeros are no clash.
        if self.grpc_port and self.grpc_port == self.rest_port:
            raise ValueError(
                f"serving.grpc_port and serving.rest_port are both {self.grpc_port}; "
                "the two APIs need different ports"
            )
        return self


class BeamConfig(_Section):
    """Beam pipeline args for Transform/StatisticsGen/Evaluator."""

    args: list[str] = Field(
        default_factory=lambda: ["--direct_running_mode=multi_processing", "--direct_num_workers=0"]
    )


class KubeflowConfig(_Section):
    """What `van-tfx compile` puts into the KFP v2 PipelineSpec."""

    image: str = "ghcr.io/van-tfx/van-tfx:0.1.0"
    pipeline_root: str = "gs://YOUR_BUCKET/van-tfx/pipeline-root"
    serving_base_path: str = "gs://YOUR_BUCKET/van-tfx/serving/van"
    data_root: str = "gs://YOUR_BUCKET/van-tfx/data"
    gpus: int = Field(0, ge=0)
    accelerator_type: str = "NVIDIA_TESLA_T4"
    trainer_cpu: float = Field(8, gt=0)
    trainer_memory_gb: float = Field(32, gt=0)
    beam_args: list[str] = Field(
        default_factory=lambda: [
            "--runner=DataflowRunner",
            "--project=YOUR_PROJECT",
            "--region=us-central1",
            "--temp_location=gs://YOUR_BUCKET/van-tfx/tmp",
            "--experiments=use_runner_v2",
        ]
    )
    experiment: str = Field("van-tfx", description="KFP experiment runs and schedules go into.")
    service_account: str = Field("", description="Kubernetes service account; empty = default.")
    # Multi-worker training on Vertex AI: the Trainer step only launches a CustomJob whose worker
    # pools run the same image; pool 0 is the chief (exports), pool 1 holds the other workers.
    vertex_training: bool = False
    vertex_project: str = "YOUR_PROJECT"
    vertex_region: str = "us-central1"
    training_workers: int = Field(2, ge=1, description="Replicas in total, chief included.")
    worker_machine_type: str = "n1-standard-8"


class Config(_Section):
    """Everything a van-tfx run needs; defaults are the official VAN ImageNet-1k recipe."""

    # The official recipe: 8 GPUs x 128 = 1024 batch, AdamW 1e-3 at 1024, 300 epochs, 5 warmup, 224
    # px. `van-tfx demo` layers DEMO_OVERRIDES on top for a few CPU minutes on the bundled digits.

    pipeline_name: str = Field("van-tfx", pattern=r"^[a-z0-9][a-z0-9-]*$")
    home: str = Field("", description="State directory; empty means $VAN_TFX_HOME.")
    # Top level, not in `train`: the train section is part of Transform's and the Trainer's
    # custom_config, so toggling a run policy there would invalidate their caches.
    retrain_on_same_data: bool = Field(
        False, description="Train even when the served model was trained on the same data."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    beam: BeamConfig = Field(default_factory=BeamConfig)
    kubeflow: KubeflowConfig = Field(default_factory=KubeflowConfig)

    @model_validator(mode="after")
    def _data_dir_is_no_glob(self) -> Config:
        # data.root is checked as a field; an empty one means <home>/data, which may hold them too.
        home = self.home or van_tfx_home()  # as written: resolving it may fail (a NUL byte)
        if not self.data.root and any(char in home for char in _GLOB_CHARS):
            raise ValueError(
                f"the data directory {home}/data (data.root is empty) must not "
                f"contain glob characters ({' '.join(_GLOB_CHARS)}): TFX globs the split "
                "patterns under it; set data.root or another home"
            )
        return self

    @model_validator(mode="after")
    def _stored_size_covers_model_input(self) -> Config:
        if self.data.max_image_side < self.model.image_size:
            raise ValueError(
                f"data.max_image_side ({self.data.max_image_side}) must be >= "
                f"model.image_size ({self.model.image_size})"
            )
        # num_classes 0 means "count synsets.txt at ingest", i.e. unknown here.
        classes = self.data.num_classes
        too_many = [
            f"{key} ({k})"
            for key, k in (("eval.top_k", self.eval.top_k), ("serving.top_k", self.serving.top_k))
            if classes and k > classes
        ]
        if too_many:
            raise ValueError(f"{' and '.join(too_many)} must be <= data.num_classes ({classes})")
        return self

    # Derived paths: computed, never stored, so a moved home keeps working.
    @property
    def home_dir(self) -> Path:
        """The state directory ($VAN_TFX_HOME unless the config names one)."""
        return Path(self.home or van_tfx_home()).expanduser().resolve()

    @property
    def data_dir(self) -> Path:
        """Where the TFRecords live."""
        return (
            Path(self.data.root).expanduser().resolve()
            if self.data.root
            else self.home_dir / "data"
        )

    @property
    def pipeline_root(self) -> Path:
        """TFX pipeline root for artifacts."""
        return self.home_dir / "pipeline_root"

    @property
    def metadata_path(self) -> Path:
        """SQLite ML Metadata database."""
        return self.home_dir / "metadata.sqlite"

    @property
    def serving_base_path(self) -> Path:
        """TF Serving model base path: <base>/<version>/saved_model.pb."""
        if self.serving.base_path:
            return Path(self.serving.base_path).expanduser().resolve()
        return self.home_dir / "serving" / self.serving.model_name


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the offending key."""


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Load a Config from YAML (or defaults) and apply `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    if path:
        data = _read_config_file(path)
    applied: list[tuple[tuple[str, ...], str]] = []
    for item in overrides or []:
        applied.append((_apply_override(data, item), item))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        source = f" in {path}" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            + _hint(err)
            + _override_note(tuple(str(p) for p in err["loc"]), applied)
            for err in exc.errors()
        )
        raise ConfigError(f"invalid config{source}: {problems}") from exc


def _hint(err: Any) -> str:
    """What to write instead, for an unknown key (the nearest known one) or a pair not a list."""
    # pydantic says only "Extra inputs are not permitted" or "Input should be a valid tuple";
    # the user then had to open config.py to find `epochs` or how a pair is spelled.
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden" and loc:
        model = _section_model(loc[:-1])
        near = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1) if model else []
        return f" (did you mean {'.'.join([*loc[:-1], near[0]])}?)" if near else ""
    if err["type"] in ("tuple_type", "list_type") and (model := _section_model(loc[:-1])):
        field = model.model_fields.get(loc[-1]) if loc else None
        if field is not None and isinstance(field.default, tuple | list) and field.default:
            return f"; write a list, e.g. [{', '.join(str(v) for v in field.default)}]"
    return ""


def _section_model(keys: list[str]) -> type[BaseModel] | None:
    """The pydantic model of the config section at dotted `keys` ([] is Config itself)."""
    model: type[BaseModel] = Config
    for key in keys:
        field = model.model_fields.get(key)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _override_note(loc: tuple[str, ...], applied: list[tuple[tuple[str, ...], str]]) -> str:
    """' (from --set ...)' naming the overrides that set `loc`, its parents or its keys."""
    # Without this a bad --set value would be blamed on the config file named in the message.
    items = [item for keys, item in applied if keys[: len(loc)] == loc or loc[: len(keys)] == keys]
    return f" (from --set {', '.join(_short(i) for i in items)})" if items and loc else ""


def _short(text: str, limit: int = 100) -> str:
    """`text`, cut in the middle past `limit` characters, so one long value can't flood a message."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader plus the YAML 1.2 exponent floats (`1e-3`); see _parse_yaml."""


# PyYAML resolves YAML 1.1, whose floats need a dot and a signed exponent (`1.0e-3`), so `1e-3`,
# `5E4` and `1.5e3` stayed strings that the strict number check refused. Only these forms are
# added, on a subclass (SafeLoader itself is shared with other code), so no other scalar changes
# type and quoted '1e-3' is still a string.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _parse_yaml(text: str, source: str, prefix: str = "") -> Any:
    """Parse one YAML document, refusing duplicate keys; ConfigError names source and line."""
    try:
        loader = _ConfigLoader(text)  # already reads the text: control characters fail here
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _refuse_duplicate_keys(loader, node, source, prefix)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {_describe_yaml_error(exc, text)}") from exc
    except RecursionError:
        # PyYAML's scanner and composer recurse once per level: `a: [[[...]]]` ~330 deep was a
        # RecursionError traceback naming no file. No config nests more than a few levels.
        raise ConfigError(
            f"{source}: not valid YAML: lists or mappings nested too deep for its parser"
        ) from None


def _where(mark: yaml.Mark) -> str:
    """'line L, column C' of a PyYAML mark (which counts from 0)."""
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _describe_yaml_error(exc: yaml.YAMLError, text: str) -> str:
    """'line L, column C: problem' for a PyYAML error (whose own text says '<unicode string>')."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        context = f" ({exc.context})" if exc.context else ""
        if exc.context and exc.context_mark is not None:
            # The problem is often at the end of the text; the context says where it began.
            context = f" ({exc.context} at {_where(exc.context_mark)})"
        return f"{_where(exc.problem_mark)}: {exc.problem}{context}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        char = exc.character
        shown = f"U+{char:04X}" if isinstance(char, int) else repr(char)
        return f"line {line}, column {column}: character {shown}: {exc.reason}"
    return str(exc)


def _refuse_duplicate_keys(
    loader: yaml.SafeLoader, root: yaml.Node, source: str, prefix: str
) -> None:
    """Raise ConfigError naming the dotted path of the first key repeated in any mapping."""
    # On the composed nodes, before construction: PyYAML's constructor keeps the last value of a
    # repeated key (`train: {epochs: 3}` then `train: {batch_size: 8}` lost epochs). Each node is
    # visited once, so aliases (shared nodes, even cyclic ones) cost nothing extra.
    stack: list[tuple[yaml.Node, str]] = [(root, prefix)]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    key = None  # a list or mapping as a key: the constructor refuses it later
                elif key_node.tag == _MERGE_TAG:
                    key = "<<"
                else:
                    key = loader.construct_object(key_node)
                child = f"{path}.{key}" if path else str(key)
                if key is not None and key in first:
                    raise ConfigError(
                        f"{source}: duplicate key {child} (at {_where(first[key].start_mark)} "
                        f"and again at {_where(key_node.start_mark)})"
                    )
                first[key] = key_node
                stack.append((value_node, child))


def _read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML config file; ConfigError naming the file for anything else."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config file {path} is a directory, not a YAML file") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line})"
        ) from exc
    data = _parse_yaml(text, f"config file {path}")
    if data is None and not text.strip():
        # Every default, silently, is rarely what an empty file meant (a failed write leaves one).
        raise ConfigError(f"config file {path} is empty; write `{{}}` in it for every default")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def _field_annotation(keys: list[str]) -> Any:
    """The type of the Config field at dotted `keys`, or None if there is no such field."""
    model: type[BaseModel] = Config
    for depth, key in enumerate(keys):
        field = model.model_fields.get(key)
        if field is None:
            return None
        annotation = field.annotation
        if depth == len(keys) - 1:
            return annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return None


def _is_text(annotation: Any) -> bool:
    """Whether a field holds one string: `str` or a Literal of strings."""
    if annotation is str:
        return True
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
    return bool(choices) and all(isinstance(choice, str) for choice in choices)


def _apply_override(data: dict[str, Any], item: str) -> tuple[str, ...]:
    """Set one `section.key=value` override in `data`; returns the key path it set."""
    if "=" not in item:
        raise ConfigError(f"override {_short(item)!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    keys = [key.strip() for key in dotted.split(".")]
    if not all(keys):
        raise ConfigError(
            f"override {_short(item)!r}: {_short(dotted)!r} is not a section.key name"
        )
    node = data
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            section = ".".join(keys[: depth + 1])
            raise ConfigError(f"override {_short(item)!r}: {section} is not a section")
    node[keys[-1]] = _override_value(keys, raw, item)
    return tuple(keys)


def _override_value(keys: list[str], raw: str, item: str) -> Any:
    """The value of one override: the text itself for string fields, else parsed as YAML."""
    text = raw.strip()
    if _is_text(_field_annotation(keys)):
        # Verbatim: a string field's value is never meant as YAML, and users type patterns and
        # names YAML would misread ({SPAN}/train-* is a mapping, *van an alias, @svc an error,
        # 2024.1 a float, no a boolean). Quotes are still honoured, to keep spaces or escapes.
        if len(text) < 2 or text[0] != text[-1] or text[0] not in "'\"":
            return text
    elif not text:
        return ""
    # YAML like the config file: `3` -> int, `1e-3` -> float, `true` -> bool, `[a, b]` -> list.
    return _parse_yaml(text, f"override {_short(item)!r}", ".".join(keys))


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write a Config as YAML that load_config reads back equal, whole or not at all."""
    # Whole or not at all: a full disk left an empty file, which then read as every default.
    path = Path(path)
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    try:
        write_local_text(path, text)
    except OSError as exc:
        raise ConfigError(f"cannot save the config to {path}: {exc.strerror or exc}") from None


# `van-tfx demo` on a fresh home: the whole product in a few CPU minutes on the bundled digits.
# Digits are not mirror-symmetric and are small, so flips are off and crops are gentle; the
# paper's heavy regularisation (RandAugment, mixup/cutmix, erasing) needs hundreds of epochs to
# pay off and is left to real runs. Everything else is the default recipe.
DEMO_OVERRIDES = [
    "model.variant=tiny",
    "model.image_size=32",
    "model.drop_path_rate=0.0",
    "train.epochs=12",
    "train.batch_size=64",
    "train.base_learning_rate=0.03",
    "train.warmup_epochs=1",
    "augment.horizontal_flip=false",
    "augment.crop_scale=[0.5, 1.0]",
    "augment.randaugment=false",
    "augment.mixup_prob=0.0",
    "augment.random_erasing_prob=0.0",
    "eval.min_top1=0.85",
    "beam.args=[--direct_running_mode=in_memory]",
]
