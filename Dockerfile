# syntax=docker/dockerfile:1
# stillroom: one image for both phases and every tool. The entrypoint is the `stillroom` CLI:
#
#   docker build -t stillroom .
#   docker run --rm -v /mnt/data:/data -v /mnt/cache:/cache -v /mnt/out:/out stillroom \
#       cache-teacher --config configs/cache_regnety160.yaml
#   docker run --rm --gpus all --shm-size 16g ... stillroom train-student --config configs/deit_small.yaml
#
# Base image. The default is python:3.11-slim. torch's PyPI wheels for Linux x86-64 bundle their
# own CUDA runtime, so this image already runs on NVIDIA GPUs (`--gpus all` with the NVIDIA
# container toolkit on the host). To build on a CUDA base instead, e.g.
#
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 -t stillroom:cuda .
#
# the step below installs the distribution's python3 (3.12 on Ubuntu 24.04; the project needs
# >= 3.11) and venv, because CUDA bases ship no Python.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# Python with venv for bases without it (CUDA images); a no-op on python:3.11-slim.
RUN if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# A non-root user with a home (timm/torch caches) and the volume mount points it may write.
RUN useradd --create-home --uid 10001 --shell /bin/bash stillroom \
    && mkdir -p /data /cache /out \
    && chown stillroom:stillroom /data /cache /out

WORKDIR /app
COPY . /app

# The install steps: the same script the README quick start and CI (.ci/run -> scripts/test.sh)
# run, so there is one list of dependencies and one way to install them. For s3:// or gs:// caches
# and shards, add the fsspec backend after it, e.g. `/opt/venv/bin/pip install s3fs`.
# VARIANT=slim removes what batch jobs do not use, in the same step (a later step would not make
# the image smaller): triton (~0.9 GB; only torch.compile on CUDA, --compile, needs it) and the
# dev tools (pytest, ruff). `scripts/build-image.sh --variant slim` builds it.
ARG VARIANT=full
# During the build only (ARGs are not kept in the image's environment), pip checks TLS against the
# system CA bundle (the same Mozilla CAs as pip's own), so that a build behind a TLS-intercepting
# proxy can bind-mount the host's bundle over it: scripts/build-image.sh does that with podman.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN VENV=/opt/venv bash scripts/setup.sh \
    && if [ "$VARIANT" = slim ]; then /opt/venv/bin/python -m pip uninstall -y -q triton pytest ruff; fi \
    && chown -R stillroom:stillroom /app

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

USER stillroom

# /data: packed webdataset shards (read), /cache: the teacher cache (phase 1 writes, phase 2
# reads), /out: checkpoints, metrics.jsonl, resolved-config.yaml. Mount host paths or shared
# filesystems here; object stores need no mount (pass s3://... URLs).
VOLUME ["/data", "/cache", "/out"]

ENTRYPOINT ["stillroom"]
CMD ["--help"]
