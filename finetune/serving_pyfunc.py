"""A recommender export as an MLflow pyfunc model that recommends (``mlflow models serve``).

Input, one row per user: ``item_ids`` (the user's history, oldest first: catalogue ids),
optional ``timestamps`` (seconds, one per item; ``null`` in a row without them: MLflow's
schema check refuses a row that leaves the key out while others have it) and ``user_id``.
Params: ``k`` (default 10) and ``explain`` (reasons per item, default 0). Output, one row per
user: ``user_id``, ``item_ids`` and ``scores`` of the top ``k`` (best first, seen items
excluded), ``unknown_items`` (history ids the catalogue does not know: skipped, counted) and,
with ``explain``, ``reasons``: per recommended item ``{"base", "other", "reasons":
[{"item_id", "contribution"}]}`` with ``base + Σ contribution + other == score``
(``finetune.explain``).

The export travels inside the logged model as an artifact and vidrec's packages as code, as
for the embedding model of ``pretrain.pyfunc``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pretrain.pyfunc import EXPORT_ARTIFACT, log_export_model

log = logging.getLogger(__name__)

DEFAULT_K = 10
PIP_REQUIREMENTS = [
    "torch", "transformers", "safetensors", "av", "pandas", "numpy", "tokenizers", "faiss-cpu",
]  # fmt: skip


def _as_list(value: Any) -> list | None:
    """A cell of a list column as a list (MLflow gives numpy arrays, JSON gives lists)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"expected a list of item ids, got {type(value).__name__}")


class RecommendationModel(mlflow.pyfunc.PythonModel):
    """Top-K items (and reasons) for user histories, from a vidrec recommender export."""

    def load_context(self, context) -> None:
        from finetune.export import load_recommender

        self.recommender = load_recommender(context.artifacts[EXPORT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        from finetune.serving import recommend_items, resolve_histories

        params = params or {}
        k, explain = int(params.get("k", DEFAULT_K)), int(params.get("explain", 0))
        if "item_ids" not in model_input.columns:
            raise ValueError("the input needs an 'item_ids' column (each user's history)")
        users, unknown_counts = [], []
        for position, record in enumerate(model_input.to_dict(orient="records")):
            user_id = record.get("user_id")
            user_id = str(position) if user_id is None or pd.isna(user_id) else str(user_id)
            times = _as_list(record.get("timestamps")) or None  # null or []: unknown
            items = [str(item) for item in _as_list(record["item_ids"]) or []]
            resolved = resolve_histories(self.recommender, [(user_id, items, times)])
            users.append(resolved.histories[0])
            unknown_counts.append(sum(resolved.unknown.values()))
        rows = recommend_items(self.recommender, users, k, explain=explain)
        by_user: dict[str, list] = {}
        for row in rows:
            by_user.setdefault(row.user_id, []).append(row)
        output = []
        for history, unknown in zip(users, unknown_counts, strict=True):
            mine = by_user.get(history.user_id, [])
            record = {
                "user_id": history.user_id,
                "item_ids": [row.item_id for row in mine],
                "scores": [float(row.score) for row in mine],
                "unknown_items": unknown,
            }
            if explain:
                record["reasons"] = [
                    {"base": row.base, "other": row.other,
                     "reasons": [asdict(reason) for reason in row.reasons or []]}
                    for row in mine
                ]  # fmt: skip
            output.append(record)
        return pd.DataFrame(output)


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema(
        [
            ColSpec("string", "user_id", required=False),
            ColSpec(Array("string"), "item_ids"),
            ColSpec(Array("double"), "timestamps", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("k", "long", DEFAULT_K), ParamSpec("explain", "long", 0)])
    return ModelSignature(inputs=inputs, params=params)


def log_recommender(
    export_dir: str | Path,
    registered_model_name: str,
    tracking_uri: str | None = None,
    experiment: str = "vidrec-export",
) -> str:
    """Log a recommender export as this pyfunc model and register it; returns
    ``models:/NAME/VERSION``."""
    import data_shards
    import finetune
    import pretrain
    from finetune.export import load_recommender
    from pretrain.export import read_info

    export_dir = Path(export_dir)
    load_recommender(export_dir)  # refuse to register something that does not load
    info = read_info(export_dir)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    tags = {"vidrec.stage": "export", "vidrec.model_id": info["model_id"],
            "vidrec.flavour": "recommendations"}  # fmt: skip
    if info.get("mlflow_run_id"):
        tags["vidrec.source_run_id"] = info["mlflow_run_id"]
    with mlflow.start_run(tags=tags) as run:
        uri = log_export_model(
            RecommendationModel(), export_dir, (finetune, pretrain, data_shards), _signature(),
            registered_model_name, PIP_REQUIREMENTS,
        )  # fmt: skip
        log.info("logged recommender %s to run %s", info["model_id"], run.info.run_id)
    return uri
