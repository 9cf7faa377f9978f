# syntax=docker/dockerfile:1
#
# The serving image the Helm chart (helm/flowact) runs: NVIDIA Triton Inference Server (python and
# TensorRT backends) with this project installed for the interpreter of the python backend.
#
# NOT BUILT OR TESTED HERE: the development and CI machines have no Docker engine and cannot reach
# nvcr.io or download.pytorch.org. Build it where both are reachable, e.g.
#   docker build --build-arg FLOWACT_BUILD_ID=$(git rev-parse --short HEAD) -t REGISTRY/flowact-triton:TAG .
#
# Versions move together. TRITON_TAG fixes CUDA and TensorRT (NGC "Triton Inference Server release
# notes"); TORCH_INDEX must match that CUDA, TENSORRT_PIP that TensorRT exactly: the engines that
# `flowact export repository --target trt` builds in the pod are loaded by the image's TensorRT backend.
ARG TRITON_TAG=25.01

FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3

ARG TRITON_TAG
# torch wheels for the base image's CUDA (12.8 for 25.01).
ARG TORCH_VERSION=2.9.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# TensorRT Python API (engine builds) at the base image's TensorRT version (10.8.0.43 for 25.01).
ARG TENSORRT_PIP=tensorrt-cu12==10.8.0.43
# Identifies this build in the engine cache key (the chart's export init container); CI passes the commit.
ARG FLOWACT_BUILD_ID=""

# The base image's system Python is the python backend's interpreter: install into it.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLOWACT_DRAIN_FILE=/tmp/flowact/draining

# 1. torch first, from the index of the matching CUDA (a bare `torch` would bring another CUDA).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# 2. TensorRT's Python API for the in-pod engine build.
RUN pip install "${TENSORRT_PIP}"

# 3. This project, not editable, with its Python dependencies (torch is already satisfied).
COPY pyproject.toml /opt/flowact/src/
COPY flowact /opt/flowact/src/flowact
COPY export /opt/flowact/src/export
COPY client /opt/flowact/src/client
COPY benchmarks /opt/flowact/src/benchmarks
COPY model_repository /opt/flowact/src/model_repository
COPY web /opt/flowact/src/web
COPY integrations /opt/flowact/src/integrations
# The trained tiny / cpu checkpoints ship in the wheel (flowact/checkpoints; `flowact serve|demo|generate`
# default to them); /opt/flowact/checkpoints stays as the path to name in --checkpoint.
COPY checkpoints /opt/flowact/src/checkpoints
RUN pip install /opt/flowact/src \
 && ln -s /opt/flowact/src/checkpoints /opt/flowact/checkpoints \
 && python3 -c "import flowact, torch; assert torch.version.cuda, 'CPU torch in a GPU image'" \
 && python3 -c "from flowact.networks import shipped_checkpoint as s; p = str(s('cpu')); assert p.endswith('flowact/checkpoints/cpu') and not p.startswith('/opt/flowact/src'), p" \
 && command -v flowact

# 4. Build hash for the engine cache: base image, wheels, project sources and checkpoints.
RUN { echo "triton=${TRITON_TAG} torch=${TORCH_VERSION} tensorrt=${TENSORRT_PIP} build=${FLOWACT_BUILD_ID}"; \
      pip freeze; \
      find /opt/flowact/src -type f | sort | xargs sha256sum; } \
    | sha256sum | cut -c1-16 > /opt/flowact/build-id

# 5. Non-root user (uid/gid 10001: the chart's podSecurityContext); the chart mounts a read-only
#    root filesystem with emptyDirs on /tmp, /dev/shm and /run/flowact.
RUN groupadd --gid 10001 flowact \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/flowact --shell /usr/sbin/nologin flowact
USER 10001:10001
WORKDIR /home/flowact

EXPOSE 8000 8001 8002
# The chart sets its own command; this default serves a repository mounted at /models.
CMD ["flowact", "serve", "--preset", "r1-480p", "--repository", "/models", \
     "--grpc-port", "8001", "--http-port", "8000", "--metrics-port", "8002", "--host", "0.0.0.0"]
