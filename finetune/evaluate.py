"""Leave-one-out evaluation of a recommender by full ranking, and the popularity baseline on
the same split: ``{split: {group: {metric}}}`` per model, ``auc`` on labelled rows.

Every rank embeds (the same module calls everywhere, as ZeRO-3 requires); rank 0 ranks and
broadcasts. Shapes: U evaluation users, L history window, D embedding size, N items.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import deepspeed
import numpy as np
import torch

from finetune import report
from finetune.batches import user_windows
from finetune.interactions import EvalSet, InteractionData
from finetune.item_source import ItemSource
from finetune.metrics import auc, evaluate_popularity, evaluate_ranking
from finetune.model import PAD_ID, IDOnlyItemTower, Recommender
from finetune.recommender import RecommenderSpec, build_model
from pretrain.distributed import World, broadcast_object
from pretrain.model import VideoTextConfig, VideoTextModel


class RankingEvaluation:
    """The validation and test splits of ``data`` and how to score a recommender on them."""

    def __init__(
        self,
        data: InteractionData,
        times_by_row: np.ndarray,
        max_history_length: int,
        user_chunk: int,
        world: World,
    ):
        self.data, self.times_by_row, self.world = data, times_by_row, world
        self.max_history_length, self.user_chunk = max_history_length, user_chunk

    @torch.no_grad()
    def user_states(self, module: Recommender, items: torch.Tensor, eval_set: EvalSet):
        """(U, D) state after each evaluation user's history window."""
        times = self.times_by_row[eval_set.histories.rows]
        device = self.world.device
        states = []
        for start in range(0, len(eval_set.users), self.user_chunk):
            users = np.arange(start, min(start + self.user_chunk, len(eval_set.users)))
            window = user_windows(eval_set.histories, times, users, self.max_history_length)
            states.append(
                module.last_user_states(
                    items[window.items.to(device)],
                    (window.items != PAD_ID).to(device),
                    window.time_gaps.to(device),
                )
            )
        return torch.cat(states)

    def evaluate(
        self, module: Recommender, items: ItemSource, splits=("valid", "test")
    ) -> dict[str, Any]:
        """Full-ranking metrics of ``module`` (a plain module: see ``gathered_copy``) whose
        items come from ``items``, per split. Every rank must call this together."""
        was_training = module.training
        module.eval()
        table = items.table(module.item_tower, self.world.device)
        results = {}
        for split in splits:
            eval_set = self.data.eval_set(split)
            states = self.user_states(module, table, eval_set)
            if not self.world.is_main:
                continue
            results[split] = self._rank(
                eval_set, lambda ex, it, s=states: module.head.score_all(s[ex], table[it])
            )
            results[split]["auc"] = self._auc(module, split, states, table)
        module.train(was_training)
        return broadcast_object(results)

    def _rank(self, eval_set: EvalSet, score_fn) -> dict[str, Any]:
        cold = torch.from_numpy(eval_set.is_cold)
        flat = evaluate_ranking(
            torch.from_numpy(eval_set.targets),
            score_fn=score_fn,
            num_items=self.data.num_items + 1,
            histories=eval_set.histories,
            groups={"warm": ~cold, "cold": cold},
            user_chunk=self.user_chunk,
        )
        return report.nest(flat)

    def _auc(self, module, split: str, states: torch.Tensor, items: torch.Tensor) -> float:
        rows = self.data.pointwise(split)
        if len(np.unique(rows["label"])) < 2:
            return math.nan
        users = torch.from_numpy(rows["user"]).to(states.device)
        scores = module.head.score_pairs(states[users], items[torch.from_numpy(rows["item"])])
        return auc(scores, rows["label"])

    def popularity(self, popularity: np.ndarray) -> dict[str, Any]:
        """The popularity baseline (``popularity``: (N + 1,) training counts)."""
        results = {}
        for split in ("valid", "test"):
            eval_set = self.data.eval_set(split)
            cold = torch.from_numpy(eval_set.is_cold)
            flat = evaluate_popularity(
                popularity,
                torch.from_numpy(eval_set.targets),
                eval_set.histories,
                groups={"warm": ~cold, "cold": cold},
            )
            results[split] = report.nest(flat)
            rows = self.data.pointwise(split)
            results[split]["auc"] = auc(popularity[rows["item"]], rows["label"])
        return results


def gathered_copy(
    module: Recommender, spec: RecommenderSpec, encoder_config: VideoTextConfig | None
) -> Recommender:
    """A plain replica of a ZeRO-3 engine's ``module`` holding its gathered weights
    (``encoder_config`` None: the ID-only tower).

    ZeRO-3 weights are whole only inside the engine's forward, and its module hooks
    re-partition even gathered weights after each submodule call, so evaluation (which calls
    tower and head methods directly, some on rank 0 only) runs on a replica without hooks.
    Every rank must call this together: the gather is a collective."""
    tower = module.item_tower
    with torch.random.fork_rng(devices=[]):  # random init must not shift training's RNG
        if isinstance(tower, IDOnlyItemTower):
            replica = build_model(spec, None)
        else:
            encoder = VideoTextModel(encoder_config)
            encoder.tie_weights()
            layers = tower.trainable_encoder_layers  # 0: frozen, as the cache requires
            replica = build_model(replace(spec, trainable_encoder_layers=layers), encoder)
    replica.requires_grad_(False)
    targets = dict(replica.named_parameters()) | dict(replica.named_buffers())
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            targets[name].data = tensor.data.detach().clone()  # dtype and device as trained
    return replica.train(module.training)
