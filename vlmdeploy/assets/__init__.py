"""Files shipped inside the package: the embedded default model and a sample image."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "internvl3_5-shapes-tiny"


def default_model_path() -> Path:
    """Directory of the embedded default model (a tiny trained InternVL3.5-architecture model)."""
    path = ROOT / DEFAULT_MODEL_NAME
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the embedded default model is missing from {path}")
    return path


def resolve_model_path(name_or_path: str | None) -> str:
    """``None`` or the default model's name → its directory; anything else is returned as is."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL_NAME:
        return str(default_model_path())
    return name_or_path


def sample_image_path() -> Path:
    """A bundled sample image (a scene of the default model's synthetic task)."""
    found = sorted(ROOT.glob("sample*.png")) + sorted(ROOT.glob("sample*.jpg"))
    if not found:
        raise FileNotFoundError(f"no sample image in {ROOT}")
    return found[0]
