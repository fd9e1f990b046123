"""The one typed configuration of van-tfx: every default lives here, every stage reads from it.

A `Config` is loaded from YAML (`$VAN_TFX_HOME/config.yaml` or `--config FILE`), overridden from the
CLI with dotted keys (`--set train.epochs=3`), validated by pydantic, and handed to each stage as
the section it needs (TFX components receive `section.model_dump()` through `custom_config`).
"""

from __future__ import annotations

import os
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


def _check_number(value: Any, kind: type) -> None:
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")


class DataConfig(_Section):
    """Where the ImageNet-style TFRecords are and how Transform stores images."""

    root: str = Field("", description="Data directory; empty means $VAN_TFX_HOME/data.")
    layout: Literal["spans", "plain"] = "spans"
    train_pattern: str = "span-{SPAN}/train-*"
    eval_pattern: str = "span-{SPAN}/validation-*"
    max_image_side: int = Field(
        512,
        ge=32,
        description="Longer side of the JPEG Transform stores: smaller JPEGs are kept byte for "
        "byte, larger images (and PNGs) are resized to it and re-encoded.",
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="Quality of re-encoded images.")
    examples_per_shard: int = Field(
        1024, ge=1, description="Records per transformed file (ImageNet-1k: 1,252 train files)."
    )
    schema_path: str = Field("", description="Curated schema; empty means the one in the repo.")
    num_classes: int = Field(
        0, ge=0, description="Label domain max for validation; 0 = count the data's synsets.txt."
    )


class ModelConfig(_Section):
    """Which VAN to build."""

    variant: Literal["b0", "b1", "b2", "b3", "b4", "b5", "b6", "tiny"] = "b0"
    image_size: int = Field(224, ge=32, multiple_of=32)
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    pretrained_weights: str = Field("", description="Converted official .weights.h5 to fine-tune.")


class AugmentConfig(_Section):
    """The paper's per-step training augmentation (timm 0.4.12 recipe); each part switchable."""

    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: bool = True
    randaugment: bool = True
    randaugment_num_ops: int = Field(2, ge=0)
    randaugment_magnitude: float = Field(9.0, ge=0, le=10)
    randaugment_magnitude_std: float = Field(0.5, ge=0)
    mixup_alpha: float = Field(0.8, ge=0)
    cutmix_alpha: float = Field(1.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    random_erasing_prob: float = Field(0.25, ge=0, le=1)
    color_jitter: float = Field(0.4, ge=0)


class TrainConfig(_Section):
    """Optimisation budget and recipe (official VAN recipe defaults, scaled to the batch)."""

    epochs: int = Field(300, ge=1)
    steps_per_epoch: int = Field(0, ge=0, description="0 means one pass over the training split.")
    batch_size: int = Field(1024, ge=1, description="Global batch size across all replicas.")
    base_learning_rate: float = Field(1e-3, gt=0, description="LR at global batch 1024.")
    warmup_epochs: float = Field(5.0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    clip_grad_norm: float = Field(0.0, ge=0, description="0 disables clipping.")
    mixed_precision: Literal["none", "mixed_bfloat16", "mixed_float16"] = "none"
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0 disables the weight EMA.")
    checkpoint_every_steps: int = Field(50, ge=1)
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
    shuffle_buffer: int = Field(2048, ge=1)
    log_every_steps: int = Field(10, ge=1, description="TensorBoard scalar cadence.")


class EvalConfig(_Section):
    """The Evaluator's blessing gate and the eval-time preprocessing."""

    crop_pct: float = Field(0.9, gt=0, le=1)
    min_top1: float = Field(0.5, ge=0, le=1)
    max_top1_drop: float = Field(0.01, ge=0, le=1, description="Allowed drop vs the baseline.")
    top_k: int = Field(5, ge=1)
    inference_batch_size: int = Field(64, ge=1)


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
    """Everything a van-tfx run needs; defaults are the official VAN ImageNet-1k recipe.

    (8 GPUs x 128 = 1024 batch, AdamW 1e-3 at 1024, 300 epochs, 5 warmup, 224 px.) `van-tfx demo`
    layers DEMO_OVERRIDES on top for a few CPU minutes on the bundled digits.
    """

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
    def _stored_size_covers_model_input(self) -> Config:
        if self.data.max_image_side < self.model.image_size:
            raise ValueError(
                f"data.max_image_side ({self.data.max_image_side}) must be >= "
                f"model.image_size ({self.model.image_size})"
            )
        return self

    # Derived paths: computed, never stored, so a moved home keeps working.
    @property
    def home_dir(self) -> Path:
        """The state directory ($VAN_TFX_HOME unless the config names one)."""
        return Path(self.home or van_tfx_home()).resolve()

    @property
    def data_dir(self) -> Path:
        """Where the TFRecords live."""
        return Path(self.data.root).resolve() if self.data.root else self.home_dir / "data"

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
            return Path(self.serving.base_path).resolve()
        return self.home_dir / "serving" / self.serving.model_name


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the offending key."""


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Load a Config from YAML (or defaults) and apply `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    for item in overrides or []:
        _apply_override(data, item)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        source = f" in {path}" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid config{source}: {problems}") from exc


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
    # YAML parsing gives `3` -> int, `true` -> bool, `[a, b]` -> list, like the config file would.
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write a Config as YAML that load_config reads back to an equal Config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


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
