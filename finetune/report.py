"""The finetune report: metrics nested by split / model / group, a printed table, a PNG bar
chart, and the flat names MLflow accepts.

Layout of ``metrics.json``'s ``metrics``: ``{split: {model: {group: {metric: value}, "auc":
value}}}`` with splits ``valid``/``test``, models named by what they are (``content`` or
``hybrid``, the trained recommender by its item tower, ``+pop`` appended when its head adds
the popularity prior, ``+predpop`` when that prior is predicted from content; the baselines
``ID-SASRec``, ``popularity``, ``content-kNN``), groups ``all``/``warm``/``cold`` and metrics
``count``, ``hr@K``, ``ndcg@K``, ``mrr``. The same names head the table, the plot's legend
and the MLflow metrics (``test/hybrid/warm/ndcg_at_10``; MLflow's character set turns ``+``
into ``_``: ``test/content_pop/...``).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_shards.atomic import atomic_write_bytes

CONTENT, HYBRID = "content", "hybrid"
"""The trained recommender: its item tower from content alone, or content plus learned IDs."""
WITH_PRIOR, WITH_PREDICTED_PRIOR = "+pop", "+predpop"
"""Suffix of a trained recommender whose head adds the learned popularity prior (of training
counts, or predicted from content)."""
ID_SASREC, POPULARITY, CONTENT_KNN = "ID-SASRec", "popularity", "content-kNN"
"""The baselines: learned IDs only, training counts, pretrained content without training."""
TABLE_METRICS = ("hr@10", "hr@20", "hr@50", "ndcg@10", "ndcg@20", "ndcg@50", "mrr")
PLOT_METRICS = ("hr@10", "ndcg@10")


def model_name(
    id_embeddings: bool, popularity_prior: bool = False, predicted_prior: bool = False
) -> str:
    """The trained recommender's name: ``hybrid`` with learned item IDs, else ``content``;
    ``+pop`` appended with the popularity prior (``content+pop``), ``+predpop`` when it is
    predicted from content (``hybrid+predpop``)."""
    suffix = ""
    if popularity_prior:
        suffix = WITH_PREDICTED_PRIOR if predicted_prior else WITH_PRIOR
    return (HYBRID if id_embeddings else CONTENT) + suffix


def nest(flat: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``evaluate_ranking``'s ``{"hr@10": .., "cold/hr@10": ..}`` → ``{"all": {..}, "cold":
    {..}}``."""
    nested: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        group, _, metric = key.rpartition("/")
        nested.setdefault(group or "all", {})[metric] = value
    return nested


def table(split_metrics: Mapping[str, Any]) -> str:
    """One line per (model, group): counts and the ranking metrics, fixed width."""
    header = f"{'model':<12} {'group':<6} {'users':>6} " + " ".join(
        f"{name:>8}" for name in TABLE_METRICS
    )
    lines = [header, "-" * len(header)]
    for model, groups in split_metrics.items():
        for group in ("all", "warm", "cold"):
            values = groups.get(group)
            if not values:
                continue
            cells = " ".join(f"{values.get(name, math.nan):8.4f}" for name in TABLE_METRICS)
            count = int(values.get("count", 0))
            lines.append(f"{model:<12} {group:<6} {count:>6} {cells}")
        if not math.isnan(groups.get("auc", math.nan)):
            lines.append(f"{model:<12} AUC {groups['auc']:.4f}")
    return "\n".join(lines)


def plot_comparison(split_metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of HR@10 and NDCG@10 per model, warm and cold targets side by side."""
    # Object-oriented matplotlib (Agg), as pretrain's loss curve: no pyplot global state.
    from matplotlib.figure import Figure

    path = Path(path)
    models = list(split_metrics)
    figure = Figure(figsize=(4.5 * len(PLOT_METRICS), 3.6), layout="constrained")
    axes = figure.subplots(1, len(PLOT_METRICS), squeeze=False)[0]
    width = 0.8 / max(1, len(models))
    for ax, metric in zip(axes, PLOT_METRICS, strict=True):
        for offset, model in enumerate(models):
            values = [
                split_metrics[model].get(group, {}).get(metric, math.nan)
                for group in ("warm", "cold")
            ]
            positions = [g + (offset - (len(models) - 1) / 2) * width for g in range(2)]
            bars = ax.bar(positions, values, width, label=model)
            ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax.set_xticks(range(2), ["warm targets", "cold-start targets"])
        ax.set_title(metric.upper())
        ax.set_ylim(0, 1)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _metric_name(*parts: str) -> str:
    """MLflow names allow letters, digits, ``_-. /``: ``hr@10`` becomes ``hr_at_10``."""
    return re.sub(r"[^\w\-. /]", "_", "/".join(parts).replace("@", "_at_"))


def mlflow_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{split: {model: {group: {metric}}}}`` → ``{"test/content/cold/hr_at_10": ..}``;
    counts and NaNs left out."""
    flat: dict[str, float] = {}
    for split, models in metrics.items():
        for model, groups in models.items():
            for group, values in groups.items():
                if not isinstance(values, Mapping):
                    if not math.isnan(values):
                        flat[_metric_name(split, model, group)] = float(values)
                    continue
                for name, value in values.items():
                    if name != "count" and not math.isnan(value):
                        flat[_metric_name(split, model, group, name)] = float(value)
    return flat
