"""Pretraining objectives: contrastive (global batch), masked video, masked language, matching.

Everything here is a pure function of tensors except ``ClipLoss``, which receives its rank and
world size from the caller; the only ``torch.distributed`` calls of the objectives live there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.config import ObjectiveWeights

IGNORE_INDEX = -100
"""Label value that ``F.cross_entropy`` skips (positions without an MLM target)."""


def weighted_total(
    losses: dict[str, torch.Tensor | None], weights: ObjectiveWeights
) -> torch.Tensor:
    """Sum of ``weight * loss`` over the objectives computed (``None`` losses are skipped)."""
    terms = [
        getattr(weights, name) * loss
        for name, loss in losses.items()
        if loss is not None and getattr(weights, name) > 0
    ]
    if not terms:
        raise ValueError("no objective was computed: every weight is 0 or every loss is None")
    return torch.stack(terms).sum()


# ----------------------------------------------------------------------------- contrastive


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass (bit for bit), gradient multiplied by ``factor``."""
    return x.detach() + (x - x.detach()) * factor


class _GatherSummingGrad(torch.autograd.Function):
    """All-gather (B, E) → (W·B, E) in rank order; backward: each rank's slice receives the
    SUM over ranks of the gradients of that slice, as ``torch.distributed.nn.functional
    .all_gather`` did (deprecated in torch 2.13, with a FutureWarning at every call).
    The backward is one all-reduce of the (small) gathered gradient, which every backend has."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, local.shape[0]
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = grad.contiguous().clone()
        dist.all_reduce(summed)
        start = ctx.rank * ctx.rows
        return summed[start : start + ctx.rows], None, None


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch (all ranks' embeddings gathered).

    Every rank computes the *same* N x N loss over the global batch (N = sum of local batches),
    so the value each rank reports equals the single-process loss on the concatenated batch.

    Gradient scaling, so that 2-rank training equals 1-process training on the same global batch
    once the data-parallel engine (DeepSpeed, DDP) AVERAGES gradients over the W ranks:

    * Write L for the global loss and z_r for rank r's local embeddings. The reference
      gradient is dL/dθ = Σ_r dL/dz_r · dz_r/dθ (θ's effect through every rank's samples).
    * gather_with_grad=True: ``torch.distributed.nn.functional.all_gather`` backward SUMS the
      gradients that all ranks send to slice r. All W ranks computed the identical L from the
      identical gathered tensors, so rank r receives W · dL/dz_r and its parameter gradient is
      W · dL/dz_r · dz_r/dθ. Averaging over ranks gives (1/W) Σ_r W · dL/dz_r · dz_r/dθ =
      dL/dθ: exactly the reference. No extra factor is needed, and none may be added.
    * gather_with_grad=False: the gather carries no gradient; the local slice is replaced by the
      local tensor (so z_r still gets dL/dz_r from rank r's own copy of L), and its gradient
      is multiplied by W to stand in for the W identical copies the summing backward would
      have added. Same gradients as above, without the backward collective.
    * ``logit_scale`` is not gathered: each rank's gradient for it is dL/ds already and the
      average keeps it. Local losses (MLM, MVM: means over the local batch) averaged over
      equal-size ranks give the global mean, so a weighted sum with this loss stays exact.
    * Copies of one clip (``groups``) change none of this: every rank gathers the same global
      ids, hence computes the same L.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """(B, E) on each rank → (W·B, E) in rank order, gradients as described above."""
        if self.world_size == 1:
            return local
        if self.gather_with_grad:
            return _GatherSummingGrad.apply(local, self.rank, self.world_size)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local.detach().contiguous())
        gathered[self.rank] = _scale_grad(local, self.world_size)
        return torch.cat(gathered, dim=0)

    def global_groups(self, local: torch.Tensor) -> torch.Tensor:
        """Local copy ids (B,) in [0, B) on each rank → (W·B,) ids, rank r's offset by r·B.

        Ranks decode different clips, so equal local ids of two ranks must not meet; ids carry
        no gradient. Ids outside [0, B) could collide with another rank's and are not checked
        (a check would cost a host sync every step).
        """
        if self.world_size == 1:
            return local
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local.contiguous())
        return torch.cat([ids + rank * len(local) for rank, ids in enumerate(gathered)])

    def forward(
        self,
        video_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss from L2-normalized local embeddings (B, E) and the (clamped) logit scale.

        ``groups`` (B,) long marks the local copies of one clip (equal ids in [0, B)).
        """
        all_video = self.gather(video_embeds)  # (N, E)
        all_text = self.gather(text_embeds)  # (N, E)
        all_groups = None if groups is None else self.global_groups(groups)  # (N,)
        return clip_loss(all_video, all_text, logit_scale, all_groups)


def clip_loss(
    video_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-process symmetric InfoNCE; row i of each input is the matching pair.

    ``groups`` (N,) long: rows with equal ids are copies of one clip (repeated sampling), which
    are not negatives of each other; see ``_copies_cross_entropy``.
    """
    if groups is not None and groups.shape != video_embeds.shape[:1]:
        raise ValueError(f"groups {tuple(groups.shape)} for {video_embeds.shape[0]} rows")
    # float32 logits: bf16 softmax over a large global batch loses the small differences
    logits_per_video = logit_scale.float() * video_embeds.float() @ text_embeds.float().T  # (N, N)
    if groups is not None:
        return (
            _copies_cross_entropy(logits_per_video, groups)
            + _copies_cross_entropy(logits_per_video.T, groups)
        ) / 2
    targets = torch.arange(logits_per_video.shape[0], device=logits_per_video.device)
    return (
        F.cross_entropy(logits_per_video, targets) + F.cross_entropy(logits_per_video.T, targets)
    ) / 2


def _copies_cross_entropy(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of row i of (N, N) ``logits`` against column i, averaged over clips.

    Row i of clip g: g's other copies leave the softmax, another clip h enters it as the mean
    of exp(logit) over h's copies, and each clip weighs 1 whatever its number of copies. When
    the copies of every clip are identical, this is exactly the loss of the de-duplicated rows.
    """
    same = groups[:, None] == groups[None, :]  # (N, N) row and column are copies of one clip
    own = torch.eye(len(groups), dtype=torch.bool, device=logits.device)  # (N, N)
    copies = same.sum(dim=1)  # (N,) copies of each row's clip
    # log-mean-exp over clip h's copies: each of h's columns gives up log(copies of h)
    logits = torch.where(same, logits, logits - copies.float().log()[None, :])
    # another copy is the same video and caption: not a negative
    logits = logits.masked_fill(same & ~own, float("-inf"))
    targets = torch.arange(logits.shape[0], device=logits.device)
    per_row = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    weights = 1.0 / copies  # (N,) a clip's copies weigh 1 together; their sum counts the clips
    return (per_row * weights).sum() / weights.sum()


# ----------------------------------------------------------------------------- masked video


def tube_mask(
    batch_size: int,
    grid: tuple[int, int, int],
    mask_ratio: float = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random tube masking (VideoMAE): (B, T'·H'·W') bool, True = masked.

    ``grid`` is (T', H', W'): tubelets along time, patches along height and width. One spatial
    mask per sample is repeated over time (a masked patch is masked in every frame, so it can't be
    copied from a neighbouring frame), with exactly ``int(mask_ratio · H'·W')`` masked patches per
    frame, hence the same count per sample, which ``VideoMAEEmbeddings`` needs to drop them.
    Drawn on the generator's device (CPU by default).
    """
    num_time, height, width = grid
    num_spatial = height * width
    num_masked = int(mask_ratio * num_spatial)
    if not 0 < num_masked < num_spatial:
        raise ValueError(
            f"mask_ratio {mask_ratio} masks {num_masked} of {num_spatial} patches per frame; "
            "need at least one masked and one visible"
        )
    device = generator.device if generator is not None else None
    noise = torch.rand(batch_size, num_spatial, generator=generator, device=device)  # (B, S)
    # the num_masked lowest-noise positions of each row: a uniform random subset per sample
    masked_idx = noise.argsort(dim=1)[:, :num_masked]
    spatial = torch.zeros(batch_size, num_spatial, dtype=torch.bool, device=noise.device)
    spatial.scatter_(1, masked_idx, True)
    return spatial[:, None, :].expand(batch_size, num_time, num_spatial).reshape(batch_size, -1)


def patchify(frames: torch.Tensor, tubelet_size: int, patch_size: int) -> torch.Tensor:
    """(B, T, C, H, W) → (B, N, ts·p·p, C), tubes in the order of VideoMAE's Conv3d embedding."""
    batch, time, channels, height, width = frames.shape
    tubes = frames.view(
        batch,
        time // tubelet_size,
        tubelet_size,
        channels,
        height // patch_size,
        patch_size,
        width // patch_size,
        patch_size,
    )
    # (B, T', H', W', ts, p, p, C): tube index (t', h', w') outermost, as Conv3d + flatten(2)
    tubes = tubes.permute(0, 1, 4, 6, 2, 5, 7, 3).contiguous()
    return tubes.view(batch, -1, tubelet_size * patch_size * patch_size, channels)


def norm_pix_targets(frames: torch.Tensor, tubelet_size: int, patch_size: int) -> torch.Tensor:
    """Per-tube, per-channel normalized pixels: (B, N, ts·p·p·C), VideoMAE ``norm_pix_loss``."""
    tubes = patchify(frames.float(), tubelet_size, patch_size)  # (B, N, P, C)
    mean = tubes.mean(dim=-2, keepdim=True)
    std = tubes.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    tubes = (tubes - mean) / (std + 1e-6)
    return tubes.flatten(2)


def masked_video_loss(
    predictions: torch.Tensor,
    frames: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    tubelet_size: int,
    patch_size: int,
) -> torch.Tensor:
    """MSE between decoder predictions (B, M, ts·p·p·C) for the masked tubes and their targets.

    ``frames`` (B, T, C, H, W) are pixels in [0, 1] (or any per-channel affine of them: the
    per-tube normalization removes it). Predictions list the masked tubes in increasing index
    order, the order boolean indexing yields.
    """
    with torch.no_grad():
        targets = norm_pix_targets(frames, tubelet_size, patch_size)  # (B, N, D)
        batch, _, dim = targets.shape
        targets = targets[bool_masked_pos].view(batch, -1, dim)  # (B, M, D)
    return F.mse_loss(predictions.float(), targets)


# ----------------------------------------------------------------------------- masked language


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Iterable[int],
    mask_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns (masked input_ids, labels), labels = IGNORE_INDEX where not chosen.

    Each real token (attention_mask 1, not a special token) is chosen with ``mask_probability``;
    a chosen token becomes [MASK] 80% of the time, a random token 10%, stays itself 10%.
    Random numbers come from ``generator`` (its device), results go to ``input_ids.device``.
    """
    device = generator.device if generator is not None else input_ids.device
    ids = input_ids.to(device)
    special = torch.as_tensor(sorted(set(special_token_ids)), dtype=ids.dtype, device=device)
    maskable = attention_mask.to(device).bool() & ~torch.isin(ids, special)  # (B, L)

    draw = torch.rand(ids.shape, generator=generator, device=device)
    chosen = maskable & (draw < mask_probability)
    # one draw decides among the three fates: [0, .8) mask, [.8, .9) random, [.9, 1) keep
    fate = torch.rand(ids.shape, generator=generator, device=device)
    to_mask = chosen & (fate < 0.8)
    to_random = chosen & (fate >= 0.8) & (fate < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=device)

    masked_ids = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    masked_ids = torch.where(to_random, random_ids.to(ids.dtype), masked_ids)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return masked_ids.to(input_ids.device), labels.to(input_ids.device)


def masked_language_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over positions whose label is not IGNORE_INDEX; 0 (with grad) if none.

    ``logits`` (..., V) and ``labels`` (...) may already be restricted to the masked positions.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    if not (labels != IGNORE_INDEX).any():
        # a batch of very short captions can draw no token; keep the graph so every rank
        # still runs the same backward
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------- matching


def matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary video-text matching: logits (P, 2), labels (P,) with 1 = matching pair."""
    return F.cross_entropy(logits.float(), labels)


def sample_hard_negatives(similarity: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row i of a (B, B) similarity, a column j != i drawn with p ∝ exp(sim[i, j]).

    Harder (more similar) negatives are likelier, as in ALBEF/BLIP; sampling rather than argmax
    keeps a near-duplicate from being picked as the negative every time.
    """
    batch = similarity.shape[0]
    if batch < 2:
        raise ValueError("video-text matching needs at least 2 pairs per local batch")
    weights = similarity.detach().float().softmax(dim=1)
    weights.fill_diagonal_(0.0)
    # rows that put all mass on the diagonal fall back to uniform over the others
    weights = weights + (weights.sum(dim=1, keepdim=True) == 0).float()
    weights.fill_diagonal_(0.0)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)


# ----------------------------------------------------------------------------- one step


class PretrainObjectives:
    """The losses of one pretraining step: draws the masks, runs the model, weighs the terms.

    Objectives with weight 0 are not computed at all (no mask drawn, no head run). Randomness
    comes from the caller's generator, so a resumed run can redraw the same masks.
    """

    def __init__(
        self,
        clip_loss: ClipLoss,
        weights: ObjectiveWeights,
        video_grid: tuple[int, int, int],
        *,
        mask_token_id: int,
        vocab_size: int,
        special_token_ids: Iterable[int],
        video_mask_ratio: float = 0.9,
        mlm_probability: float = 0.15,
        full_clip_for_contrastive: bool = False,
        contrastive_masking: bool = False,
    ):
        self.clip_loss = clip_loss
        self.weights = weights
        self.video_grid = video_grid
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.special_token_ids = list(special_token_ids)
        self.video_mask_ratio = video_mask_ratio
        self.mlm_probability = mlm_probability
        self.full_clip_for_contrastive = full_clip_for_contrastive
        self.contrastive_masking = contrastive_masking and video_mask_ratio > 0

    def __call__(
        self, model, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``batch``: video (B, T, C, H, W) uint8, input_ids and attention_mask (B, L), on the
        model's device, and optionally clip_group (B,) long: equal ids mark copies of one clip
        (repeated sampling), which the contrastive loss keeps from being negatives of each
        other. Returns each computed objective by name and their weighted sum "loss".
        ``model`` may be the bare model or a wrapper that forwards keyword arguments (DeepSpeed).
        """
        weights = self.weights
        video, input_ids = batch["video"], batch["input_ids"]
        attention_mask = batch["attention_mask"]
        inputs = {}
        if weights.masked_video > 0 or self.contrastive_masking:
            inputs["bool_masked_pos"] = tube_mask(
                video.shape[0], self.video_grid, self.video_mask_ratio, generator
            ).to(video.device)
        if weights.masked_language > 0:
            inputs["mlm_input_ids"], inputs["mlm_labels"] = mask_tokens(
                input_ids,
                attention_mask,
                mask_token_id=self.mask_token_id,
                vocab_size=self.vocab_size,
                special_token_ids=self.special_token_ids,
                mask_probability=self.mlm_probability,
                generator=generator,
            )
        output = model(
            video=video,
            input_ids=input_ids,
            attention_mask=attention_mask,
            video_text_matching=weights.matching > 0,
            full_clip_for_contrastive=self.full_clip_for_contrastive,
            reconstruct=weights.masked_video > 0,
            **inputs,
        )
        losses = {
            "contrastive": (
                self.clip_loss(
                    output.video_embeds,
                    output.text_embeds,
                    output.logit_scale,
                    groups=batch.get("clip_group"),
                )
                if weights.contrastive > 0
                else None
            ),
            "masked_video": output.masked_video_loss,
            "masked_language": output.masked_language_loss,
            "matching": output.matching_loss,
        }
        losses = {name: loss for name, loss in losses.items() if loss is not None}
        losses["loss"] = weighted_total(losses, weights)
        return losses
