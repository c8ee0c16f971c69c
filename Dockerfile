# The project image every Kubeflow component runs in (components/__init__.py: PCM_IMAGE).
#   docker build -t ghcr.io/pcm-pipelines/pcm:0.1.0 .
# CUDA runtime base; Python 3.11 (the package's pin); the exact versions of requirements.lock, with torch 2.13.0 from
# the CUDA 12.8 wheel index; a non-root user. Weights and data are mounted (PVCs), never baked in.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 pcm
WORKDIR /opt/pcm

COPY requirements.lock pyproject.toml README.md ./
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
 && /opt/venv/bin/pip install --no-cache-dir -r requirements.lock bitsandbytes

COPY pcm ./pcm
COPY components ./components
COPY pipelines ./pipelines
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . && chown -R pcm:pcm /opt/pcm

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/pcm \
    HF_HOME=/mnt/work/huggingface \
    PYTHONUNBUFFERED=1
USER pcm
CMD ["pcm", "--help"]
