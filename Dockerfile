# syntax=docker/dockerfile:1
# The van-tfx image: every Kubeflow step and every Vertex AI training replica runs in it.
#
# Why not FROM tensorflow/tensorflow:2.16.2-gpu: that image ships Python 3.11, and TFX 1.16 only
# supports Python 3.10. Ubuntu/Debian images with a 3.10 interpreter plus NVIDIA's CUDA wheels give
# the same GPU runtime: TF 2.16 wheels find the nvidia-* packages in site-packages, and the GPU
# driver itself comes from the node (NVIDIA device plugin), not from the image.
ARG PYTHON_IMAGE=python:3.10-slim-bookworm
# The real model server, from the tensorflow/serving image of the version production serves
# (serving/manifests.py TF_SERVING_VERSION; TF 2.16 -> 2.16.1): the pipeline's ServingSmokeTest
# validates candidates with it whenever it is on PATH, and records which server did.
ARG TF_SERVING_IMAGE=tensorflow/serving:2.16.1
# Beam's worker boot program, from the SDK image of the locked apache-beam and this Python: Dataflow
# (and the portable runner with --environment_type=DOCKER) start their workers from this image
# through /opt/apache/beam/boot, so Transform and Evaluator workers have TFX and our code
# (pipeline/beam_workers.py names this image as the Dataflow workers' environment).
ARG BEAM_SDK_IMAGE=apache/beam_python3.10_sdk:2.59.0
FROM ${TF_SERVING_IMAGE} AS tf_serving
FROM ${BEAM_SDK_IMAGE} AS beam_sdk

FROM ${PYTHON_IMAGE}

ARG UV_VERSION=0.13.9
# 1 = add the CUDA 12.3 / cuDNN 8.9 libraries TF 2.16.2 was built against (GPU nodes); 0 = CPU only.
ARG WITH_CUDA=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /app
# Locked third-party stack first: this layer is reused while only our code changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project

# The exact pins of `tensorflow[and-cuda]==2.16.2` (not in uv.lock, which is solved for CPU CI).
RUN if [ "$WITH_CUDA" = "1" ]; then \
      uv pip install --no-cache --python /opt/venv/bin/python \
        nvidia-cublas-cu12==12.3.4.1 nvidia-cuda-cupti-cu12==12.3.101 \
        nvidia-cuda-nvcc-cu12==12.3.107 nvidia-cuda-nvrtc-cu12==12.3.107 \
        nvidia-cuda-runtime-cu12==12.3.101 nvidia-cudnn-cu12==8.9.7.29 \
        nvidia-cufft-cu12==11.0.12.1 nvidia-curand-cu12==10.3.4.107 \
        nvidia-cusolver-cu12==11.5.4.101 nvidia-cusparse-cu12==12.2.0.103 \
        nvidia-nccl-cu12==2.19.3 nvidia-nvjitlink-cu12==12.3.101; \
    fi

# One binary (glibc and libstdc++ from this Debian image); fail the build here if it cannot run.
COPY --from=tf_serving /usr/bin/tensorflow_model_server /usr/local/bin/tensorflow_model_server
RUN tensorflow_model_server --version
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
# Beam's boot otherwise makes a fresh venv per worker on the base interpreter, which can't see
# /opt/venv: the workers would lack TFX and our code (ModuleNotFoundError).
ENV RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1

COPY van_tfx ./van_tfx
COPY van_trainer ./van_trainer
COPY pipeline ./pipeline
COPY components ./components
COPY serving ./serving
# Non-editable: the steps import van_tfx, van_trainer, components... from site-packages.
RUN uv sync --frozen --no-dev --no-editable
# The Trainer's C++ depthwise kernels (van_trainer/kernels), compiled against this TensorFlow into
# the installed package; the compiler leaves the image in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && python -m van_trainer.kernels.build \
    && apt-get purge -y --auto-remove g++ && rm -rf /var/lib/apt/lists/*

# Steps never need root. KFP, Vertex AI and the TFJob example set the command (python -m
# pipeline.kfp_entrypoint, TFX's run_executor), which replaces this entrypoint; Beam's workers run
# the image as it is, so the entrypoint is Beam's boot program, as in Beam's own SDK images.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin van
USER 1000
ENV HOME=/home/van VAN_TFX_HOME=/home/van/van_tfx_home
WORKDIR /home/van
ENTRYPOINT ["/opt/apache/beam/boot"]
