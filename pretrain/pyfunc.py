"""The export as an MLflow pyfunc model, and its registration in the MLflow model registry.

Input: a DataFrame with a ``text`` column (item title, caption or query) and optionally
``clip_path`` (a local video file; empty or missing → no video embedding for that row).
Output: a DataFrame with ``text_embedding`` and ``video_embedding`` (lists of float32,
L2-normalized, in the joint space; ``video_embedding`` is None where there was no clip) and
``model_id``. Clips are decoded and cropped exactly as the eval reader does, so a served
embedding equals the one ``vidrec embed`` wrote for the same clip.

The export directory travels inside the logged model as an artifact, and the ``pretrain`` and
``data_shards`` packages as code, so ``mlflow.pyfunc.load_model("models:/NAME/1")`` works in
an environment that has the pip requirements but not this repository.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch

log = logging.getLogger(__name__)

EXPORT_ARTIFACT = "export"
DEFAULT_REGISTERED_NAME = "vidrec-video-text"
EXPERIMENT = "vidrec-export"
VIDEO_BATCH = 16
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "av", "pandas", "numpy", "tokenizers"]


def load_clip(path: str | Path, num_frames: int, size: int) -> torch.Tensor:
    """A video file → (T, C, size, size) uint8: uniform frames, centre crop, as the eval reader.

    Uses the reader's own cropper so that serving and ``vidrec embed`` cannot drift apart.
    """
    from data_shards.frames import ClipCropper, uniform_frame_indices
    from data_shards.video import decode_clip

    select = functools.partial(uniform_frame_indices, num_frames=num_frames)
    data = Path(path).read_bytes()
    return torch.from_numpy(decode_clip(data, select=select, convert=ClipCropper(size)))


class VideoTextEmbedder(mlflow.pyfunc.PythonModel):
    """Text and (optional) clip embeddings from a vidrec export."""

    def load_context(self, context) -> None:
        from pretrain.export import load_export

        self.exported = load_export(context.artifacts[EXPORT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        exported = self.exported
        if "text" not in model_input.columns:
            raise ValueError("the input needs a 'text' column")
        texts = model_input["text"].fillna("").astype(str).tolist()
        text_embeds = exported.embed_text(texts).cpu().numpy()  # (N, E)

        video_embeds: list[list[float] | None] = [None] * len(texts)
        if "clip_path" in model_input.columns:
            rows = [
                (row, path)
                for row, path in enumerate(model_input["clip_path"].tolist())
                if isinstance(path, str) and path
            ]
            preprocessing = exported.preprocessing
            for start in range(0, len(rows), VIDEO_BATCH):
                chunk = rows[start : start + VIDEO_BATCH]
                clips = torch.stack(
                    [
                        load_clip(path, preprocessing.num_frames, preprocessing.image_size)
                        for _, path in chunk
                    ]
                )  # (B, T, C, H, W)
                for (row, _), embedding in zip(chunk, exported.embed_video(clips), strict=True):
                    video_embeds[row] = embedding.cpu().tolist()
        return pd.DataFrame(
            {
                "text_embedding": [embedding.tolist() for embedding in text_embeds],
                "video_embedding": video_embeds,
                "model_id": exported.model_id,
            }
        )


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "text"), ColSpec("string", "clip_path", required=False)])
    return ModelSignature(inputs=inputs)


def log_export(
    export_dir: str | Path,
    run_id: str | None = None,
    registered_model_name: str = DEFAULT_REGISTERED_NAME,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
) -> str:
    """Log ``export_dir`` as a pyfunc model to a run and register it; returns the
    ``models:/NAME/VERSION`` URI of the new version.

    ``run_id`` None starts a run in ``experiment``, tagged with the training run the export
    came from (``vidrec.source_run_id``); otherwise the model is logged into that run.
    """
    import data_shards
    import pretrain
    from pretrain.export import load_export, read_info

    export_dir = Path(export_dir)
    load_export(export_dir)  # refuse to register something that does not load
    info = read_info(export_dir)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if run_id is None:
        mlflow.set_experiment(experiment)
    tags = {"vidrec.stage": "export", "vidrec.model_id": info["model_id"]}
    if info.get("mlflow_run_id"):
        tags["vidrec.source_run_id"] = info["mlflow_run_id"]
    with mlflow.start_run(run_id=run_id, tags=tags if run_id is None else None) as run:
        if run_id is not None:
            mlflow.set_tags(tags)
        uri = log_export_model(
            VideoTextEmbedder(), export_dir, (pretrain, data_shards), _signature(),
            registered_model_name, PIP_REQUIREMENTS,
        )  # fmt: skip
        log.info("logged %s to run %s", info["model_id"], run.info.run_id)
    return uri


def log_export_model(
    python_model, export_dir: Path, packages, signature, registered_model_name: str, pip: list
) -> str:
    """Log ``python_model`` into the active run with the export directory as its artifact
    and vidrec's ``packages`` as its code, register it; returns ``models:/NAME/VERSION``."""
    logged = mlflow.pyfunc.log_model(
        name="model",
        python_model=python_model,
        artifacts={EXPORT_ARTIFACT: str(export_dir)},
        code_paths=[str(Path(package.__file__).parent) for package in packages],
        pip_requirements=pip,
        signature=signature,
        registered_model_name=registered_model_name,
    )
    return f"models:/{registered_model_name}/{logged.registered_model_version}"
