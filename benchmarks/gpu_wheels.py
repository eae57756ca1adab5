"""The wheels the lent GPU machine needs and cannot download (it has no internet).

    python benchmarks/gpu_wheels.py download       # here: fills .whl/, .gpu-cu13/ and .gpu-cu13-2/
    python3 benchmarks/gpu_wheels.py requirements  # there (gpu.sh): what pip must satisfy

.whl/ holds FlashAttention-4 and the CUTLASS DSL (installed with --target, no dependencies) and
.whl/deps/ our own requirements for CPython 3.12 on manylinux: gpu.sh installs from it only what
the machine's image lacks. The DSL's CUDA 13 libraries (a 92 MB wheel) are over one call's
carry limit, so they travel unpacked and xz-compressed (65 MB), the archive cut in two parts
(.gpu-cu13/ and .gpu-cu13-2/, each under the limit beside the tree), in two calls of their own
that gpu.sh's setup joins (benchmarks/README.md). Git ignores all three folders.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What FlashAttention-4 needs besides pyproject's `flash` extra, fetched one wheel at a time
# (--no-deps: torch is the image's, and the cu13 libraries, over one call's size limit, travel
# apart). The CUTLASS DSL's libraries follow the DSL's pinned version.
FLASH_DEPS = ["apache-tvm-ffi", "torch-c-dlpack-ext"]
# Where the CUDA 13 libraries' archive travels, one part per call (gpu.sh joins them in order).
CU13_PARTS = (".gpu-cu13", ".gpu-cu13-2")
# The generated gRPC stubs need these, above pyproject's floor for the client side.
STUBS = ["protobuf>=5.27", "grpcio>=1.66.2"]
# What the GPU image brings and must keep: never downloaded, never replaced.
IMAGE = {"torch", "numpy", "transformers", "safetensors", "huggingface_hub", "tokenizers",
         "triton"}
# Of the test extras, what the GPU tests (gpu.sh tests) and benchmarks/serving.py import.
GPU_TESTS = {"pytest", "pytest_timeout", "httpx", "aiohttp"}
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64",
                    "manylinux_2_5_x86_64", "manylinux1_x86_64") for arg in ("--platform", tag)]


def _name(requirement: str) -> str:
    for sep in "<>=!~[ ;":
        requirement = requirement.split(sep)[0]
    return requirement.lower().replace("-", "_")


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def flash_wheels() -> tuple[list[str], str]:
    """(the wheels of the `flash` extra and their dependencies, the cu13 libraries' wheel)."""
    extra = _project()["optional-dependencies"]["flash"]
    dsl = next(r for r in extra if _name(r) == "nvidia_cutlass_dsl").split("==")[1]
    pins = [r.replace("[cu13]", "") for r in extra]
    libs = [f"nvidia-cutlass-dsl-libs-{part}=={dsl}" for part in ("base", "core")]
    return pins + libs + FLASH_DEPS, f"nvidia-cutlass-dsl-libs-cu13=={dsl}"


def requirements() -> list[str]:
    project = _project()
    extras = project["optional-dependencies"]
    tests = [r for r in extras["test"] if _name(r) in GPU_TESTS]
    wanted = project["dependencies"] + extras["shard"] + tests + STUBS
    return [r for r in wanted if _name(r) not in IMAGE]


def download() -> None:
    whl, deps = os.path.join(ROOT, ".whl"), os.path.join(ROOT, ".whl", "deps")
    pip = [sys.executable, "-m", "pip", "download", "-q", *PLATFORM]
    flash, cu13 = flash_wheels()
    subprocess.run(pip + ["--pre", "--no-deps", "-d", whl, *flash], check=True)
    subprocess.run(pip + ["-d", deps, *requirements()], check=True)
    for path in glob.glob(os.path.join(deps, "*.whl")):
        if _name(os.path.basename(path)) in IMAGE:
            os.remove(path)  # pulled in as a dependency; the image has its own
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(pip + ["--no-deps", "-d", tmp, cu13], check=True)
        unpacked = os.path.join(tmp, "unpacked")
        zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]).extractall(unpacked)
        archive = os.path.join(tmp, "cu13.tar.xz")
        with tarfile.open(archive, "w:xz") as tar:
            tar.add(unpacked, arcname=".")
        with open(archive, "rb") as f:
            data = f.read()
    half = (len(data) + 1) // 2
    for index, folder in enumerate(CU13_PARTS):
        os.makedirs(os.path.join(ROOT, folder), exist_ok=True)
        with open(os.path.join(ROOT, folder, f"cu13.tar.xz.{index}"), "wb") as f:
            f.write(data[index * half:(index + 1) * half])


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "requirements":
        print(" ".join(requirements()))  # no spaces inside: gpu.sh word-splits it
    elif command == "download":
        download()
    else:
        sys.exit(__doc__)
