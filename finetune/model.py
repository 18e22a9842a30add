"""Recommendation finetune model: item tower, SASRec user tower, ranking head and losses.

Pure torch modules and functions: no ranks, no engine, no logging backends. The trainer decides
what is distributed and how; the losses here see the local rows and whatever candidates the
trainer hands them.

Shapes: B users (or rows), L history length, K clips per item, T/C/H/W clip frames, Lt text
tokens, E pretrained joint embedding size, D item / user embedding size, S sampled negatives,
C = B + S candidates, N items scored at once, U users whose histories mask the negatives.

Item ids: ``PAD_ID`` (0) marks padding everywhere (histories, candidates, ID tables); real items
are 1..num_items, so a cache or table indexed by item id has num_items + 1 rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from finetune.popularity import PopularityPredictor
from pretrain.model import VideoTextModel

PAD_ID = 0
"""Item id of padding (history slots, unused candidate slots); never a real item."""


# ============================================================================= item tower


@dataclass
class ContentEmbeddings:
    """What the (possibly frozen) encoders say about items, before the item tower's own layers.

    Every field has the same leading shape (...): one row per item. An item without clips has
    ``video_mask`` False and a zero ``video`` row; the same for text. Indexed by item id this is
    the cache of the fast path (row ``PAD_ID`` empty): ``cache[item_ids]`` gives the content of
    any (B,) or (B, L) id tensor.
    """

    video: torch.Tensor
    """(..., E) normalized mean of the item's normalized clip embeddings; zero without clips."""
    text: torch.Tensor
    """(..., E) normalized joint text embedding; with an item tower that reads pooled text
    (``ItemTower(pooled_text=True)``) the (..., Dt) pooled sentence features of the text
    tower instead. Zero without text."""
    video_mask: torch.Tensor
    """(...,) bool, True where the item has at least one clip."""
    text_mask: torch.Tensor
    """(...,) bool, True where the item has text."""

    @classmethod
    def empty(cls, num_rows: int, dim: int, device: torch.device | str | None = None):
        """A cache of ``num_rows`` items with no content, to be filled by ``cache[ids] = ...``."""
        zeros = torch.zeros(num_rows, dim, device=device)
        no = torch.zeros(num_rows, dtype=torch.bool, device=device)
        return cls(zeros, zeros.clone(), no, no.clone())

    @classmethod
    def cat(cls, parts: Sequence[ContentEmbeddings]) -> ContentEmbeddings:
        """Concatenate along the first dimension (e.g. the batches of a cache pass)."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def __getitem__(self, index) -> ContentEmbeddings:
        return ContentEmbeddings(*(getattr(self, f.name)[index] for f in fields(self)))

    def __setitem__(self, index, value: ContentEmbeddings) -> None:
        for f in fields(self):
            getattr(self, f.name)[index] = getattr(value, f.name).to(getattr(self, f.name))

    def to(self, device: torch.device | str) -> ContentEmbeddings:
        return ContentEmbeddings(*(getattr(self, f.name).to(device) for f in fields(self)))

    def joint_embedding(self, text_projection: nn.Module | None = None) -> torch.Tensor:
        """(..., E) the items in the pretrained joint space: their available modalities mixed
        evenly and renormalized (what an untrained ``ItemTower.combine`` computes before its
        projection); zero without content. ``text_projection``: the encoder's, for content
        whose text is pooled features."""
        text = self.text
        if text_projection is not None:
            text = F.normalize(text_projection(text), dim=-1)
        mixed = self.video_mask[..., None] * self.video + self.text_mask[..., None] * text
        return F.normalize(mixed, dim=-1)


class ItemTower(nn.Module):
    """Item embedding from clips and text (either may be missing), optionally plus a learned ID.

    Two stages, so that frozen encoders can be run once over the catalogue and cached:

    1. ``encode_content`` (the pretrained ``VideoTextModel``): each available clip → normalized
       video embedding, averaged over the item's clips and renormalized; the item's text →
       normalized text embedding. Missing modalities are flagged, not imputed.
    2. ``combine`` (this tower's own parameters, always cheap): a learned convex mix of the
       available modalities, renormalized (a single-modality item gets exactly that modality);
       a linear projection E → D (identity at init when D == E, no bias, so an item without
       content stays zero); plus, in the hybrid model, a learned ID embedding for warm items.
       The result is L2-normalized.

    ``forward`` is ``combine(encode_content(...))`` and ``from_cache`` is ``combine(cache[ids])``,
    so both paths give the same embedding for the same weights. The cache is only valid while the
    encoders are frozen (``freeze_encoders``); a frozen encoder is kept in eval mode (no dropout)
    and run without autograd, so live and cached content agree exactly.

    ID embeddings start at zero, so at init the hybrid tower equals the content tower. Cold
    items (``id_mask`` False; their ids may lie beyond the table) get no ID contribution, so a
    new item is served from content alone without growing the table.

    Pooled text (``pooled_text``): the encoders hand over the text tower's pooled sentence
    features, and the tower projects them into the joint space with its own copy of the
    encoder's text projection. At init that is the joint text embedding; the copy trains with
    the recommender even while the encoders are frozen, so it can take back what the joint
    space dropped: attributes a caption names that the video tower never learned to see.
    """

    def __init__(
        self,
        encoder: VideoTextModel,
        dim: int | None = None,
        num_item_ids: int = 0,
        pooled_text: bool = False,
    ):
        """``dim`` D of the output (default E); ``num_item_ids`` > 0 adds an ID table of
        ``num_item_ids + 1`` rows (row ``PAD_ID`` is fixed at zero); ``pooled_text``: see the
        class docstring."""
        super().__init__()
        self.encoder = encoder
        embed_dim = encoder.config.embed_dim
        self.dim = dim or embed_dim
        self.text_projection = None
        if pooled_text:
            pretrained = encoder.text_projection
            self.text_projection = nn.Linear(pretrained.in_features, pretrained.out_features)
            self.text_projection.load_state_dict(pretrained.state_dict())
        # sigmoid(0) = 0.5: video and text start equally weighted. Shape (1,) for DeepSpeed.
        self.modality_logit = nn.Parameter(torch.zeros(1))
        self.projection = nn.Linear(embed_dim, self.dim, bias=False)
        if self.dim == embed_dim:
            nn.init.eye_(self.projection.weight)
        self.id_embeddings = None
        if num_item_ids > 0:
            self.id_embeddings = nn.Embedding(num_item_ids + 1, self.dim, padding_idx=PAD_ID)
            nn.init.zeros_(self.id_embeddings.weight)
        self.trainable_encoder_layers: int | Literal["all"] = "all"
        """How many top encoder blocks of each tower train: 0 (frozen), k, or "all"."""
        self.unfreeze_encoders()

    # ------------------------------------------------------------------ freezing

    def _embedding_path(self) -> list[nn.Module]:
        """The encoder modules an item embedding passes through; fusion, MLM head, matching head
        and the VideoMAE decoder are not used here and stay frozen in every mode."""
        encoder = self.encoder
        return [
            encoder.video_model,
            encoder.video_norm,
            encoder.video_projection,
            encoder.text_model,
            encoder.text_projection,
        ]

    def _set_trainable(self, top_k: int | Literal["all"]) -> None:
        self.encoder.requires_grad_(False)
        if top_k == "all":
            for module in self._embedding_path():
                module.requires_grad_(True)
        elif top_k > 0:
            encoder = self.encoder
            video_layers, text_layers = (
                encoder.video_model.encoder.layer,
                encoder.text_model.encoder.layer,
            )
            if top_k > min(len(video_layers), len(text_layers)):
                raise ValueError(f"top_k={top_k} exceeds the encoder depth")
            # the top blocks and everything above them (final norm, projections)
            for module in [*video_layers[-top_k:], *text_layers[-top_k:]]:
                module.requires_grad_(True)
            for module in (encoder.video_norm, encoder.video_projection, encoder.text_projection):
                module.requires_grad_(True)
        elif top_k < 0:
            raise ValueError(f"top_k must be >= 0 or 'all', got {top_k}")
        self.encoder.text_model.pooler.requires_grad_(False)  # unused, kept for the export
        if self.text_projection is not None:  # pooled text: the tower's own copy is used
            self.encoder.text_projection.requires_grad_(False)
        self.trainable_encoder_layers = top_k
        self.train(self.training)  # a frozen encoder goes to eval mode

    def freeze_encoders(self) -> None:
        """Only ``combine``'s parameters train; the content of every item can be cached."""
        self._set_trainable(0)

    def unfreeze_top_k(self, k: int) -> None:
        """The top ``k`` blocks of both towers (and the norm / projections above them) train."""
        self._set_trainable(k)

    def unfreeze_encoders(self) -> None:
        """Every encoder module on the item-embedding path trains (the default)."""
        self._set_trainable("all")

    @property
    def encoders_frozen(self) -> bool:
        return self.trainable_encoder_layers == 0

    def train(self, mode: bool = True) -> ItemTower:
        super().train(mode)
        if self.encoders_frozen:
            self.encoder.eval()  # the cached content was computed without dropout
        return self

    # ------------------------------------------------------------------ stage 1: encoders

    def encode_content(
        self,
        clips: torch.Tensor | None = None,  # (B, K, T, C, H, W) uint8
        clip_mask: torch.Tensor | None = None,  # (B, K) bool, True = real clip
        input_ids: torch.Tensor | None = None,  # (B, Lt)
        attention_mask: torch.Tensor | None = None,  # (B, Lt)
        text_mask: torch.Tensor | None = None,  # (B,) bool, True = item has text
    ) -> ContentEmbeddings:
        """Run the encoders on the real clips and texts only (padding clips and empty texts
        cost nothing). ``clips`` / ``input_ids`` None: no item of the batch has that modality.
        ``clip_mask`` defaults to all clips real, ``text_mask`` to every item with a token."""
        if clips is None and input_ids is None:
            raise ValueError("an item batch needs clips, text, or both")
        batch = len(clips) if clips is not None else len(input_ids)
        embed_dim = self.encoder.config.embed_dim
        text_dim = self.text_dim
        device = next(self.encoder.parameters()).device
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoders_frozen):
            video = torch.zeros(batch, embed_dim, device=device)
            video_mask = torch.zeros(batch, dtype=torch.bool, device=device)
            if clips is not None:
                if clip_mask is None:
                    clip_mask = torch.ones(clips.shape[:2], dtype=torch.bool, device=clips.device)
                clip_embeddings = torch.zeros(*clip_mask.shape, embed_dim, device=device)
                if clip_mask.any():
                    _, real = self.encoder.encode_video(clips[clip_mask])  # (M, E)
                    clip_embeddings = clip_embeddings.masked_scatter(
                        clip_mask[..., None].to(device), real.float()
                    )  # (B, K, E)
                video = F.normalize(clip_embeddings.sum(dim=1), dim=-1)  # (B, E), 0 if no clip
                video_mask = clip_mask.any(dim=1).to(device)

            text = torch.zeros(batch, text_dim, device=device)
            has_text = torch.zeros(batch, dtype=torch.bool, device=device)
            if input_ids is not None:
                if attention_mask is None:
                    attention_mask = torch.ones_like(input_ids)
                if text_mask is None:
                    text_mask = attention_mask.bool().any(dim=1)
                has_text = text_mask.to(device)
                if has_text.any():
                    real = self.encode_text(input_ids[text_mask], attention_mask[text_mask])
                    text = text.masked_scatter(has_text[:, None], real.float())  # (B, Et)
        return ContentEmbeddings(video, text, video_mask, has_text)

    @property
    def text_dim(self) -> int:
        """Et, the width of ``ContentEmbeddings.text``: E, or Dt with pooled text."""
        if self.text_projection is None:
            return self.encoder.config.embed_dim
        return self.text_projection.in_features

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(M, Lt) texts → (M, Et): the joint embedding, or the pooled features (pooled text)."""
        if self.text_projection is None:
            return self.encoder.encode_text(input_ids, attention_mask)[1]
        return self.encoder.text_features(input_ids, attention_mask)

    # ------------------------------------------------------------------ stage 2: own layers

    def combine(
        self,
        content: ContentEmbeddings,  # fields (..., E) / (...,)
        item_ids: torch.Tensor | None = None,  # (...,)
        id_mask: torch.Tensor | None = None,  # (...,) bool, True = warm (use the ID row)
    ) -> torch.Tensor:
        """Content (and ID) → normalized item embeddings (..., D). ``id_mask`` defaults to
        every non-padding id; ids of cold items may lie beyond the table."""
        return self.combine_with_content(content, item_ids, id_mask)[0]

    def combine_with_content(
        self,
        content: ContentEmbeddings,
        item_ids: torch.Tensor | None = None,
        id_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``combine`` and beside it the content-only embeddings (..., D): what each item is
        without its ID (a cold or new item's embedding; the popularity predictor's input)."""
        video_weight = torch.sigmoid(self.modality_logit)  # (1,)
        text = content.text
        if self.text_projection is not None:
            text = F.normalize(self.text_projection(text), dim=-1)  # (..., Dt) → (..., E)
        mixed = (
            video_weight * content.video_mask[..., None] * content.video
            + (1 - video_weight) * content.text_mask[..., None] * text
        )  # (..., E)
        hidden = self.projection(F.normalize(mixed, dim=-1))  # (..., D)
        content_only = F.normalize(hidden, dim=-1)
        if self.id_embeddings is None:
            return content_only, content_only
        if item_ids is None:
            raise ValueError("a hybrid item tower needs item_ids")
        if id_mask is None:
            id_mask = item_ids != PAD_ID
        rows = self.id_embeddings(torch.where(id_mask, item_ids, PAD_ID))  # (..., D)
        return F.normalize(hidden + rows * id_mask[..., None], dim=-1), content_only

    def forward(
        self,
        clips: torch.Tensor | None = None,
        clip_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        item_ids: torch.Tensor | None = None,
        id_mask: torch.Tensor | None = None,
        with_content: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """End-to-end item embeddings (B, D); arguments as in ``encode_content`` / ``combine``
        (``with_content``: ``combine_with_content``'s pair)."""
        content = self.encode_content(clips, clip_mask, input_ids, attention_mask, text_mask)
        if with_content:
            return self.combine_with_content(content, item_ids, id_mask)
        return self.combine(content, item_ids, id_mask)

    def from_cache(
        self,
        cache: ContentEmbeddings,  # fields (num_items + 1, E), indexed by item id
        item_ids: torch.Tensor,  # (...,)
        id_mask: torch.Tensor | None = None,  # (...,)
    ) -> torch.Tensor:
        """Fast path: item embeddings (..., D) from cached content; needs frozen encoders."""
        if not self.encoders_frozen:
            raise RuntimeError("cached content is stale once encoder layers train")
        return self.combine(cache[item_ids], item_ids, id_mask)


class IDOnlyItemTower(nn.Module):
    """Learned ID embeddings only: the item side of the plain SASRec baseline.

    Shares the user tower, head and losses with the content model, so the comparison isolates
    what the content adds. Initialized like SASRec's embedding (normal, std D^-1/2).
    """

    def __init__(self, num_items: int, dim: int):
        super().__init__()
        self.dim = dim
        self.id_embeddings = nn.Embedding(num_items + 1, dim, padding_idx=PAD_ID)
        nn.init.normal_(self.id_embeddings.weight, std=dim**-0.5)
        with torch.no_grad():
            self.id_embeddings.weight[PAD_ID].zero_()

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        """(...,) ids → (..., D); padding gives zeros."""
        return self.id_embeddings(item_ids)


# ============================================================================= user tower


def bucketize_time_gaps(time_gaps: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Seconds since the previous interaction → bucket ids (same shape).

    Bucket 0 is "unknown" (a negative gap: the first item of a history, or padding); bucket
    k >= 1 holds gaps in [2^(k-1) - 1, 2^k - 1) seconds, the last bucket everything longer.
    Log spacing because a minute versus an hour matters as much as a day versus a month.
    """
    known = time_gaps >= 0
    buckets = 1 + torch.floor(torch.log2(1 + time_gaps.clamp(min=0).float())).long()
    return torch.where(known, buckets.clamp(max=num_buckets - 1), 0)


class UserTower(nn.Module):
    """SASRec: a causal transformer over the embeddings of a user's history.

    Built on ``nn.TransformerEncoder`` (pre-LayerNorm, as SASRec reimplementations found more
    stable) rather than BERT modules: it needs no config object, takes a plain boolean
    attention mask, and is not tied to transformers' masking helpers, which change across
    versions. Attention: position i sees real positions j <= i, and always itself, so a padding
    slot never has an empty row (no NaN) and real positions never see padding.

    Positions count real items from the oldest (the first real item is position 0 wherever
    the padding lies), so a state depends only on the items up to it: left and right padding
    give the same states, and a prefix state is exactly the state of that shorter history.
    """

    def __init__(
        self,
        dim: int,
        num_layers: int = 2,
        num_heads: int = 2,
        max_length: int = 200,
        dropout: float = 0.1,
        num_time_buckets: int = 0,
        feedforward_multiplier: int = 4,
    ):
        """``num_time_buckets`` > 0 adds embeddings of ``bucketize_time_gaps``."""
        super().__init__()
        self.num_heads = num_heads
        self.num_time_buckets = num_time_buckets
        self.position_embeddings = nn.Embedding(max_length, dim)
        self.time_embeddings = nn.Embedding(num_time_buckets, dim) if num_time_buckets else None
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim,
            num_heads,
            feedforward_multiplier * dim,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        for embedding in (self.position_embeddings, self.time_embeddings):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=0.02)

    def attention_blocked(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) real-item mask → (B·heads, L, L) bool, True where query i may NOT see key j."""
        length = mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        diagonal = torch.eye(length, dtype=torch.bool, device=mask.device)
        allowed = causal & (mask[:, None, :] | diagonal)  # (B, L, L)
        return (~allowed).repeat_interleave(self.num_heads, dim=0)

    def forward(
        self,
        history: torch.Tensor,  # (B, L, D) item embeddings
        mask: torch.Tensor,  # (B, L) bool, True = real item
        time_gaps: torch.Tensor | None = None,  # (B, L) seconds since the previous item
    ) -> torch.Tensor:
        """States at every position (B, L, D), zero at padding. The state at position i sums
        up items 0..i and is trained to predict item i + 1."""
        mask = mask.bool()
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        hidden = history + self.position_embeddings(positions)
        if self.time_embeddings is not None:
            if time_gaps is None:
                raise ValueError("a user tower with time buckets needs time_gaps")
            hidden = hidden + self.time_embeddings(
                bucketize_time_gaps(time_gaps, self.num_time_buckets)
            )
        states = self.encoder(self.dropout(hidden), mask=self.attention_blocked(mask))
        return states * mask[..., None]  # (B, L, D)

    @staticmethod
    def last_states(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) states → (B, D) at each user's most recent real item (zero if none)."""
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask.bool(), positions, -1).amax(dim=1).clamp(min=0)  # (B,)
        return states[torch.arange(len(states), device=states.device), last]


# ============================================================================= ranking head


class RankingHead(nn.Module):
    """Score of (user state, item embedding) pairs.

    "dot": cosine (``normalize``) or raw dot product times a logit scale 1 / temperature,
    learnable (clamped like CLIP) or fixed. Scoring B users against N items is one matmul:
    O(B·N·D) time, B·N memory, so it serves full-catalogue retrieval.

    "mlp": an MLP over [u, i, u * i] (the concatenation of NCF / DIN-style rankers), more
    expressive but pairwise: ``score_all`` materializes (B, N, 3D) features and runs the MLP on
    every pair, O(B·N·D·hidden) time and O(B·N·(3D + hidden)) memory. Meant for re-ranking a
    few hundred candidates, not for retrieval.

    Popularity prior (``num_prior_items`` > 0): every logit gets ``scale · w · prior[item_id]``,
    the prior a fixed buffer of centred log training counts (``popularity_prior``, set by the
    trainer), ``scale`` the logit scale and ``w`` a learned scalar starting at 0, so at init
    the scores are the plain head's. ``w`` is in the cosine's units: an optimizer step moves
    it as far as the other weights, where a bare logit weight would need steps 1 / temperature
    times larger to count. Scoring then needs the items' ids; a new item takes ``PAD_ID``,
    whose prior is 0 (the mean of the warm items), like every item without training
    interactions.

    Predicted prior (``predicted_prior``, ``finetune.popularity``): the prior table holds a
    ``PopularityPredictor``'s value of each catalogue item (set before evaluation and export),
    training passes the live values (``item_prior``), and a ``PAD_ID`` item is a new one: its
    prior is predicted from the embedding it is scored with, its content alone.
    """

    def __init__(
        self,
        dim: int,
        kind: Literal["dot", "mlp"] = "dot",
        temperature: float = 0.05,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        normalize: bool = True,
        mlp_hidden: int = 256,
        num_prior_items: int = 0,
        predicted_prior: bool = False,
    ):
        """``num_prior_items`` > 0 adds the popularity prior over item ids 0..num_prior_items,
        ``predicted_prior`` predicts it from content (needs ``num_prior_items``)."""
        super().__init__()
        if kind not in ("dot", "mlp"):
            raise ValueError(f"kind must be 'dot' or 'mlp', got {kind!r}")
        if temperature <= 0 or 1 / temperature > max_logit_scale:
            raise ValueError("need 0 < 1 / temperature <= max_logit_scale")
        self.kind = kind
        self.normalize = normalize
        self.max_logit_scale = max_logit_scale
        log_scale = torch.tensor([math.log(1 / temperature)])  # (1,): DeepSpeed cannot view 0-d
        if learn_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        self.mlp = None
        if kind == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(3 * dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, 1)
            )
        if num_prior_items > 0:
            self.register_buffer("popularity_prior", torch.zeros(num_prior_items + 1))
            self.popularity_weight = nn.Parameter(torch.zeros(1))  # (1,) for DeepSpeed
        else:
            self.popularity_prior = self.popularity_weight = None
        if predicted_prior and num_prior_items < 1:
            raise ValueError("a predicted prior needs num_prior_items > 0")
        self.prior_predictor = (
            PopularityPredictor(dim, num_prior_items) if predicted_prior else None
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        """(1,) 1 / temperature, clamped to ``max_logit_scale``."""
        return self.log_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    def _prepare(self, users: torch.Tensor, items: torch.Tensor):
        if self.normalize:
            return F.normalize(users, dim=-1), F.normalize(items, dim=-1)
        return users, items

    def _mlp(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        features = torch.cat([users, items, users * items], dim=-1)  # (..., 3D)
        return self.mlp(features).squeeze(-1)

    @torch.no_grad()
    def set_popularity_prior(self, counts: torch.Tensor) -> None:
        """The prior from (num_prior_items + 1,) training counts (``centred_log_popularity``)."""
        if self.popularity_prior is None or counts.shape != self.popularity_prior.shape:
            shape = None if self.popularity_prior is None else tuple(self.popularity_prior.shape)
            raise ValueError(f"counts of shape {tuple(counts.shape)}, the prior has {shape}")
        self.popularity_prior.copy_(centred_log_popularity(counts))

    def _with_prior(
        self,
        logits: torch.Tensor,  # (..., N)
        item_ids: torch.Tensor | None,  # (N,) or (..., N)
        items: torch.Tensor,  # (N, D) or (..., N, D) the embeddings scored
        item_prior: torch.Tensor | None = None,  # like item_ids: the prior, given
    ) -> torch.Tensor:
        """``logits`` plus scale · w · prior of the items: ``item_prior``, or the table's row
        of each id (a predicted prior predicts a ``PAD_ID`` item's from its embedding)."""
        if self.popularity_prior is None:
            return logits
        if item_prior is None:
            if item_ids is None:
                raise ValueError("a head with a popularity prior needs item_ids")
            item_ids = item_ids.to(self.popularity_prior.device)
            item_prior = self.popularity_prior[item_ids]
            new = item_ids == PAD_ID
            if self.prior_predictor is not None and new.any():
                rows = new.nonzero(as_tuple=True)
                content = items.expand(*item_ids.shape, items.shape[-1])[rows]
                item_prior = item_prior.index_put(rows, self.prior_predictor.from_content(content))
        return logits + self.logit_scale * self.popularity_weight * item_prior

    def score_all(
        self,
        users: torch.Tensor,  # (B, D)
        items: torch.Tensor,  # (N, D)
        item_ids: torch.Tensor | None = None,  # (N,): the popularity prior's rows
        item_prior: torch.Tensor | None = None,  # (N,): the prior itself (training)
    ) -> torch.Tensor:
        """(B, N) logits of every user against every item (see the class docstring for the
        cost); ``item_ids`` (or ``item_prior``) are needed with the popularity prior only."""
        raw = items
        users, items = self._prepare(users, items)
        if self.mlp is None:
            logits = self.logit_scale * users @ items.T  # (B, N)
        else:
            batch, count = len(users), len(items)
            logits = self._mlp(
                users[:, None].expand(batch, count, -1), items[None].expand(batch, count, -1)
            )  # (B, N)
        return self._with_prior(logits, item_ids, raw, item_prior)

    def score_pairs(
        self,
        users: torch.Tensor,  # (..., D)
        items: torch.Tensor,  # (..., D)
        item_ids: torch.Tensor | None = None,  # (...): the popularity prior's rows
        item_prior: torch.Tensor | None = None,  # (...): the prior itself (training)
    ) -> torch.Tensor:
        """(...) logits, row by row; ``item_ids`` / ``item_prior`` as in ``score_all``."""
        raw = items
        users, items = self._prepare(users, items)
        if self.mlp is None:
            logits = self.logit_scale * (users * items).sum(dim=-1)
        else:
            logits = self._mlp(*torch.broadcast_tensors(users, items))
        return self._with_prior(logits, item_ids, raw, item_prior)


def centred_log_popularity(counts: torch.Tensor) -> torch.Tensor:
    """(N + 1,) training counts → the popularity prior (N + 1,) float: log(1 + count) minus its
    mean over the items with a count, 0 for the others (padding, cold-start and new items are
    scored as an average item)."""
    counts = torch.as_tensor(counts)
    seen = counts > 0
    log_counts = torch.log1p(counts.double())
    centred = log_counts - log_counts[seen].mean() if seen.any() else log_counts
    return torch.where(seen, centred, 0.0).float()


# ============================================================================= recommender


class Recommender(nn.Module):
    """Item tower + user tower + head. The item tower is either ``ItemTower`` (content, maybe
    hybrid) or ``IDOnlyItemTower``; the trainer embeds items with it (live or from the cache)
    and hands the embeddings here, since which item path runs is a training-recipe choice.

    ``forward`` is ``user_states``, so an engine wrapping this module can be called directly.
    """

    def __init__(
        self, item_tower: ItemTower | IDOnlyItemTower, user_tower: UserTower, head: RankingHead
    ):
        super().__init__()
        self.item_tower = item_tower
        self.user_tower = user_tower
        self.head = head

    def user_states(
        self,
        history_item_embeddings: torch.Tensor,  # (B, L, D)
        mask: torch.Tensor,  # (B, L) bool
        time_gaps: torch.Tensor | None = None,  # (B, L) seconds
    ) -> torch.Tensor:
        """States at every history position (B, L, D), for next-item training."""
        return self.user_tower(history_item_embeddings, mask, time_gaps)

    def last_user_states(
        self,
        history_item_embeddings: torch.Tensor,  # (B, L, D)
        mask: torch.Tensor,  # (B, L) bool
        time_gaps: torch.Tensor | None = None,  # (B, L)
    ) -> torch.Tensor:
        """The state after each user's most recent item (B, D), for inference."""
        states = self.user_tower(history_item_embeddings, mask, time_gaps)
        return UserTower.last_states(states, mask)

    def score(
        self,
        user_states: torch.Tensor,  # (B, D)
        item_embeddings: torch.Tensor,  # (N, D)
        item_ids: torch.Tensor | None = None,  # (N,), needed with the popularity prior
    ) -> torch.Tensor:
        """(B, N) logits."""
        return self.head.score_all(user_states, item_embeddings, item_ids)

    def forward(
        self,
        history_item_embeddings: torch.Tensor,
        mask: torch.Tensor,
        time_gaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.user_states(history_item_embeddings, mask, time_gaps)


# ============================================================================= losses


def mixed_sampling_log_q(
    candidate_ids: torch.Tensor,  # (C,)
    targets_per_user: torch.Tensor,  # (num_items + 1,) mean count among one user's targets
    batch_users: int,
    num_uniform: int,
    num_items: int,
) -> torch.Tensor:
    """log of the expected count of each candidate in a mixed candidate set (C,).

    In-batch candidates are the next-item targets of B users drawn uniformly: item j arrives
    B·t_j times on average, t_j its mean count among one user's targets (the windows the
    sampler cuts, not the training counts); sampled negatives are uniform over ``num_items``
    (S draws). An item's expected count is B·t_j + S / N whichever way it arrived: up to a
    constant the mixture q = α·p + (1 − α) / N of the logQ correction for mixed negative
    sampling (Yi et al. 2019; Yang et al. 2020), p the targets' distribution and α their
    expected share of the candidates.
    """
    rate = targets_per_user.to(torch.float64)[candidate_ids]
    expected = batch_users * rate + num_uniform / num_items
    return expected.log().float()


def history_exclusion(
    history_ids: torch.Tensor,  # (U, L), PAD_ID padded
    candidate_ids: torch.Tensor,  # (C,)
) -> torch.Tensor:
    """(U, C) bool: candidate c is in user u's history. Costs U·L·C booleans."""
    in_history = history_ids[:, :, None] == candidate_ids[None, None, :]  # (U, L, C)
    return (in_history & (history_ids != PAD_ID)[:, :, None]).any(dim=1)


def sampled_softmax_loss(
    user_states: torch.Tensor,  # (R, D)
    positive_ids: torch.Tensor,  # (R,)
    positive_embeddings: torch.Tensor,  # (R, D)
    negative_ids: torch.Tensor,  # (S,)
    negative_embeddings: torch.Tensor,  # (S, D)
    head: RankingHead,
    candidate_log_q: torch.Tensor | None = None,  # (R + S,)
    history_ids: torch.Tensor | None = None,  # (U, L)
    history_index: torch.Tensor | None = None,  # (R,) row → history row
    row_weights: torch.Tensor | None = None,  # (R,) >= 0
    candidate_prior: torch.Tensor | None = None,  # (R + S,) a predicted popularity prior
) -> torch.Tensor:
    """Softmax over in-batch positives and sampled negatives, mean over rows (weighted by
    ``row_weights`` when given).

    Candidates are [the R positives of the batch, then the S sampled negatives]; row r's target
    is candidate r. For each row the following candidates are removed (logit -inf), because
    they are not negatives for that user: copies of the row's own positive (another row with
    the same positive, a sampled duplicate), items of the user's history (``history_ids``
    row ``history_index[r]``, default r; when training every position of a sequence, pass
    the whole sequence once per user so later items are not used as negatives for earlier
    positions), and padding candidates. The target itself is never removed. Rows whose positive
    is ``PAD_ID`` are skipped, so per-position rows can be passed unfiltered.

    ``candidate_log_q`` (e.g. ``mixed_sampling_log_q``) is subtracted from each candidate's
    logit, so that popular items, which appear more often as negatives, are not pushed down
    merely for being popular (sampled-softmax correction).
    """
    candidate_ids = torch.cat([positive_ids, negative_ids])  # (C,)
    candidates = torch.cat([positive_embeddings, negative_embeddings])  # (C, D)
    logits = head.score_all(user_states, candidates, candidate_ids, candidate_prior)  # (R, C)
    if candidate_log_q is not None:
        logits = logits - candidate_log_q[None, :]

    rows = torch.arange(len(positive_ids), device=logits.device)
    excluded = (candidate_ids[None, :] == positive_ids[:, None]) | (candidate_ids == PAD_ID)[None]
    if history_ids is not None:
        in_history = history_exclusion(history_ids, candidate_ids)  # (U, C)
        excluded |= in_history if history_index is None else in_history[history_index]
    excluded[rows, rows] = False
    logits = logits.masked_fill(excluded, float("-inf"))

    valid = positive_ids != PAD_ID
    if not valid.any():
        return user_states.sum() * 0  # zero, still connected to the graph for backward
    if row_weights is None:
        return F.cross_entropy(logits[valid], rows[valid])
    losses = F.cross_entropy(logits[valid], rows[valid], reduction="none")
    weights = row_weights[valid]
    return (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)


def pointwise_bce_loss(
    user_states: torch.Tensor,  # (R, D)
    item_embeddings: torch.Tensor,  # (R, D)
    labels: torch.Tensor,  # (R,) in [0, 1], e.g. click / like / long watch
    head: RankingHead,
    item_ids: torch.Tensor | None = None,  # (R,), needed with the popularity prior
    item_prior: torch.Tensor | None = None,  # (R,) a predicted popularity prior
) -> torch.Tensor:
    """Binary cross-entropy on labelled (user, item) rows, for explicit feedback (impressions
    with and without a click) that the softmax over implicit positives cannot use."""
    logits = head.score_pairs(user_states, item_embeddings, item_ids, item_prior)  # (R,)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
