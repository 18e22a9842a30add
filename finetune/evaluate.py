"""Leave-one-out evaluation of a recommender by full ranking, and the training-free baselines
(popularity, content-kNN) on the same split: ``{split: {group: {metric}}}`` per model, ``auc``
on labelled rows.

Every rank embeds (the same module calls everywhere, as ZeRO-3 requires); rank 0 ranks and
broadcasts. Shapes: U evaluation users, L history window, D embedding size, E pretrained
embedding size, N items.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.nn.functional as F

from finetune import report
from finetune.batches import Windows, user_windows
from finetune.interactions import EvalSet, InteractionData
from finetune.item_source import ItemSource, refresh_predicted_prior
from finetune.metrics import auc, embedding_score_fn, evaluate_popularity, evaluate_ranking
from finetune.model import PAD_ID, ContentEmbeddings, IDOnlyItemTower, Recommender
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
    def window_states(self, eval_set: EvalSet, state_fn: Callable[[Windows], torch.Tensor]):
        """(U, D) ``state_fn`` of each evaluation user's history window, users in chunks."""
        times = self.times_by_row[eval_set.histories.rows]
        states = []
        for start in range(0, len(eval_set.users), self.user_chunk):
            users = np.arange(start, min(start + self.user_chunk, len(eval_set.users)))
            states.append(
                state_fn(user_windows(eval_set.histories, times, users, self.max_history_length))
            )
        return torch.cat(states)

    def user_states(self, module: Recommender, items: torch.Tensor, eval_set: EvalSet):
        """(U, D) state after each evaluation user's history window."""
        device = self.world.device

        def last_state(window: Windows) -> torch.Tensor:
            return module.last_user_states(
                items[window.items.to(device)],
                (window.items != PAD_ID).to(device),
                window.time_gaps.to(device),
            )

        return self.window_states(eval_set, last_state)

    def evaluate(
        self, module: Recommender, items: ItemSource, splits=("valid", "test")
    ) -> dict[str, Any]:
        """Full-ranking metrics of ``module`` (a plain module: see ``gathered_copy``) whose
        items come from ``items``, per split. Every rank must call this together."""
        was_training = module.training
        module.eval()
        table = items.table(module.item_tower, self.world.device)
        refresh_predicted_prior(module, items, self.world.device)
        results = {}
        for split in splits:
            eval_set = self.data.eval_set(split)
            states = self.user_states(module, table, eval_set)
            if not self.world.is_main:
                continue
            results[split] = self._rank(
                eval_set, lambda ex, it, s=states: module.head.score_all(s[ex], table[it], it)
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
        return self._pair_auc(
            split, lambda u, i: module.head.score_pairs(states[u.to(states.device)], items[i], i)
        )

    def _pair_auc(self, split: str, pair_scores) -> float:
        """AUC of ``pair_scores(users (P,), items (P,)) -> (P,)`` on ``split``'s labelled rows;
        NaN without both labels."""
        rows = self.data.pointwise(split)
        if len(np.unique(rows["label"])) < 2:
            return math.nan
        users, items = torch.from_numpy(rows["user"]), torch.from_numpy(rows["item"])
        return auc(pair_scores(users, items), rows["label"])

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

    @torch.no_grad()
    def content_knn(
        self, content: ContentEmbeddings, text_projection: torch.nn.Module | None = None
    ) -> dict[str, Any]:
        """The training-free content-kNN baseline: a user is the mean of the pretrained joint
        embeddings (``content``: the cache of the pretrained encoders, (N + 1) rows) of the
        items in its history window, and every item is scored by its cosine to that mean.
        ``text_projection``: the pretrained encoder's, when ``content`` holds pooled text
        features. Rank 0 scores; every rank must call this together."""
        results = {}
        if self.world.is_main:
            # (N + 1, E), unit rows, zero at padding
            items = content.joint_embedding(text_projection)
            for split in ("valid", "test"):
                eval_set = self.data.eval_set(split)
                users = self.window_states(eval_set, lambda w: history_mean(items, w.items))
                results[split] = self._rank(eval_set, embedding_score_fn(users, items))
                results[split]["auc"] = self._pair_auc(
                    split, lambda u, i, s=users: (s[u] * items[i]).sum(dim=-1)
                )
        return broadcast_object(results)


def history_mean(item_embeddings: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """(U, E) unit mean of the (N + 1, E) ``item_embeddings`` of each (U, L) window's items
    (``PAD_ID`` slots left out; zero for an empty window)."""
    windows = windows.to(item_embeddings.device)
    real = (windows != PAD_ID).unsqueeze(-1)  # (U, L, 1)
    total = (item_embeddings[windows] * real).sum(dim=1)  # (U, E): the mean's direction
    return F.normalize(total, dim=-1)


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
