"""The finetune report: metrics nested by split / model / group, a printed table, a PNG bar
chart, and the flat names MLflow accepts.

Layout of ``metrics.json``'s ``metrics``: ``{split: {model: {group: {metric: value}, "auc":
value}}}`` with splits ``valid``/``test``, models ``content``/``id_sasrec``/``popularity``,
groups ``all``/``warm``/``cold`` and metrics ``count``, ``hr@K``, ``ndcg@K``, ``mrr``.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_shards.atomic import atomic_write_bytes

MODEL_NAMES = {"content": "content", "id_sasrec": "ID-SASRec", "popularity": "popularity"}
TABLE_METRICS = ("hr@10", "hr@20", "hr@50", "ndcg@10", "ndcg@20", "ndcg@50", "mrr")
PLOT_METRICS = ("hr@10", "ndcg@10")


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
            lines.append(f"{MODEL_NAMES.get(model, model):<12} {group:<6} {count:>6} {cells}")
        if not math.isnan(groups.get("auc", math.nan)):
            lines.append(f"{MODEL_NAMES.get(model, model):<12} AUC {groups['auc']:.4f}")
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
            bars = ax.bar(positions, values, width, label=MODEL_NAMES.get(model, model))
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
