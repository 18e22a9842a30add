"""Where item embeddings come from: learned IDs only, cached content (frozen encoders), or live
encoders over the clip store and the tokenized texts. Training, evaluation and export all ask
an ``ItemSource`` for the inputs of some item ids and embed them with ``embed_items``.

``embed_items`` runs inside the engine's forward during training (ZeRO-3 weights are whole
only there), so it takes the inputs as plain tensors, prepared outside by ``ItemSource.inputs``.
Shapes: K items, E encoder embedding size, D item embedding size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.item_content import ClipStore, ItemTexts
from finetune.model import PAD_ID, ContentEmbeddings, IDOnlyItemTower, ItemTower, Recommender

EMBED_CHUNK = 65_536
"""Items embedded at once from IDs or cached content (a cheap projection)."""


@dataclass
class ItemInputs:
    """What the item tower needs for K items; at most one content source is set."""

    item_ids: torch.Tensor  # (K,) long, may include PAD_ID
    id_mask: torch.Tensor | None = None  # (K,) bool, warm items (the hybrid tower's ID rows)
    content: ContentEmbeddings | None = None  # fields (K, E) / (K,): the frozen-encoder cache
    clips: torch.Tensor | None = None  # (K, Kc, T, C, H, W) uint8: live encoders
    clip_mask: torch.Tensor | None = None  # (K, Kc) bool
    input_ids: torch.Tensor | None = None  # (K, Lt)
    attention_mask: torch.Tensor | None = None  # (K, Lt)
    text_mask: torch.Tensor | None = None  # (K,) bool


def embed_items(
    tower: ItemTower | IDOnlyItemTower, inputs: ItemInputs, with_content: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(K, D) embeddings of ``inputs`` through ``tower``; ``with_content``: and the (K, D)
    content-only embeddings beside them (``ItemTower.combine_with_content``)."""
    if isinstance(tower, IDOnlyItemTower):
        return tower(inputs.item_ids)
    if inputs.content is not None:
        if not tower.encoders_frozen:
            raise RuntimeError("cached content is stale once encoder layers train")
        combine = tower.combine_with_content if with_content else tower.combine
        return combine(inputs.content, inputs.item_ids, inputs.id_mask)
    return tower(
        inputs.clips,
        inputs.clip_mask,
        inputs.input_ids,
        inputs.attention_mask,
        inputs.text_mask,
        item_ids=inputs.item_ids,
        id_mask=inputs.id_mask,
        with_content=with_content,
    )


@dataclass
class ItemSource:
    """The items of a run: ``warm`` (N + 1,) bool marks items with training interactions (the
    hybrid tower's ID rows apply to them); content comes from ``cache`` or from ``clips`` and
    ``texts``; neither: learned IDs only (the ID-SASRec baseline)."""

    warm: torch.Tensor
    cache: ContentEmbeddings | None = None
    clips: ClipStore | None = None
    texts: ItemTexts | None = None
    content_batch_size: int = 32
    """Items per live-encoder forward."""

    @property
    def num_items(self) -> int:
        return len(self.warm) - 1

    @property
    def live(self) -> bool:
        return self.clips is not None

    @property
    def ids_only(self) -> bool:
        return self.cache is None and self.clips is None

    def inputs(self, ids: torch.Tensor, device: torch.device) -> ItemInputs:
        """What a tower needs to embed ``ids`` (K,), on ``device``."""
        inputs = ItemInputs(ids.to(device))
        if self.ids_only:
            return inputs
        ids = ids.cpu()
        inputs.id_mask = (self.warm[ids] & (ids != PAD_ID)).to(device)
        if self.cache is not None:
            inputs.content = self.cache[ids.to(self.cache.video.device)].to(device)
            return inputs
        clips, clip_mask = self.clips.get(ids)
        inputs.clips, inputs.clip_mask = clips.to(device), clip_mask.to(device)
        inputs.input_ids = self.texts.input_ids[ids].to(device)
        inputs.attention_mask = self.texts.attention_mask[ids].to(device)
        inputs.text_mask = self.texts.text_mask[ids].to(device)
        return inputs

    @torch.no_grad()
    def table(
        self, tower: ItemTower | IDOnlyItemTower, device: torch.device, with_ids: bool = True
    ) -> torch.Tensor:
        """(N + 1, D) embeddings of every item (row ``PAD_ID`` included); ``with_ids`` False:
        from content alone, as if no item had been seen in training."""
        ids = torch.arange(self.num_items + 1)
        chunk = self.content_batch_size if self.live else EMBED_CHUNK
        parts = []
        for part in ids.split(chunk):
            inputs = self.inputs(part, device)
            if not with_ids and inputs.id_mask is not None:
                inputs.id_mask = torch.zeros_like(inputs.id_mask)
            parts.append(embed_items(tower, inputs))
        return torch.cat(parts)

    def anchors(self) -> torch.Tensor:
        """With live encoders: an item with a clip and one with text (ids), embedded with
        every training batch under ZeRO-3 so that each rank runs both encoders at every step
        (ZeRO-3 gathers a module's weights with a collective; a rank whose items all lack clips
        would skip the video encoder and the ranks would deadlock). Empty otherwise."""
        if not self.live:
            return torch.zeros(0, dtype=torch.long)
        found = []
        for present in (self.clips.has_clip, self.texts.text_mask):
            real = torch.nonzero(present.bool()[1:]).squeeze(1) + 1
            found += real[:1].tolist()
        return torch.tensor(found, dtype=torch.long)


@torch.no_grad()
def refresh_predicted_prior(model: Recommender, items: ItemSource, device: torch.device) -> None:
    """Write every catalogue item's predicted popularity prior into the head's prior table:
    content head + correction for warm items, content head alone for the others (row
    ``PAD_ID`` 0). Evaluation and export call it, so that the table they score with and
    write is the predictor's; a head without a predictor is left alone."""
    head = model.head
    if head.prior_predictor is None:
        return
    content = items.table(model.item_tower, device, with_ids=False)  # (N + 1, D)
    ids = torch.arange(len(content), device=content.device)
    warm = items.warm.to(content.device) & (ids != PAD_ID)
    prior = head.prior_predictor(content, ids, warm)
    head.popularity_prior.copy_(torch.where(ids == PAD_ID, 0.0, prior))
