"""Matmul FLOPs of a pretraining step, counted from the config (for throughput and MFU).

Counts 2 FLOPs per multiply-add of every matrix product (linear layers, convolution,
attention scores and mixing); norms, softmax and elementwise work are left out, as usual.
tests/test_model.py checks the count against ``torch.utils.flop_counter`` on eager attention.
MFU counts model FLOPs (forward + backward); the forward that activation checkpointing runs
again in backward is hardware FLOPs, counted apart (HFU).
"""

from __future__ import annotations

import math

from pretrain.config import PretrainConfig
from pretrain.model import VideoTextConfig

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
"""Dense bf16 tensor-core peak FLOP/s per device kind, for MFU; devices not listed get none."""

CHECKPOINTED = ("video_encoder", "video_decoder", "text_encoder", "fusion")
"""Components made of transformer layers only, every one a ``GradientCheckpointingLayer``:
what activation checkpointing runs again (embeddings, projections and heads it does not)."""


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of the first kind ``device_name`` contains ("A100" is listed
    before "A10"), None when none is."""
    return next((flops for kind, flops in PEAK_BF16_FLOPS.items() if kind in device_name), None)


def layer_flops(length: int, width: int, intermediate: int, context: int | None = None) -> int:
    """Forward FLOPs of one transformer layer on one sample: self-attention over ``length``
    tokens, cross-attention to ``context`` tokens (of the same width) if given, feed-forward."""
    flops = 2 * length * 4 * width * width  # q, k, v, o projections
    flops += 2 * 2 * length * length * width  # scores and weighted sum
    flops += 2 * 2 * length * width * intermediate  # feed-forward in and out
    if context is not None:
        flops += 2 * 2 * length * width * width  # cross q, o
        flops += 2 * 2 * context * width * width  # cross k, v on the video tokens
        flops += 2 * 2 * length * context * width  # cross scores and weighted sum
    return flops


def forward_flops(
    config: VideoTextConfig,
    text_length: int,
    *,
    mask_ratio: float | None = 0.9,
    mlm_targets: float | None = None,
    matching: bool = False,
    full_clip_for_contrastive: bool = False,
    decoder: bool = True,
    recomputed: bool = False,
) -> dict[str, float]:
    """Forward FLOPs per sample of ``VideoTextModel.forward``, by component (the layer stacks,
    ``CHECKPOINTED``, apart from the embeddings and projections around them).

    ``mask_ratio`` None or 0: no masked video modelling (whole clip encoded once).
    ``mlm_targets``: average masked tokens per caption (about mlm_probability x real tokens,
    ``masked_tokens``), None: no MLM. ``decoder`` False: the masked clip feeds the contrastive
    loss only (``objectives.contrastive_masking``). ``recomputed``: only what activation
    checkpointing runs again in backward.
    """
    if isinstance(mlm_targets, bool):
        raise TypeError("mlm_targets is a count of masked tokens per caption, not a flag")
    video, text = config.video_config, config.text_config
    num_time, height, width = config.video_grid
    num_tubes = num_time * height * width
    tube_pixels = video.num_channels * video.tubelet_size * video.patch_size**2
    num_masked = 0 if mask_ratio is None else num_time * int(mask_ratio * height * width)
    num_visible = num_tubes - num_masked
    video_width, text_width = video.hidden_size, text.hidden_size

    def video_layers(count, length, width, intermediate):
        flops = count * layer_flops(length, width, intermediate)
        if recomputed:
            # torch's checkpoint stops recomputing once every tensor backward needs is back:
            # the last feed-forward projection of a pre-norm (VideoMAE) layer feeds only the
            # residual sum and is skipped; BERT's post-norm layers are recomputed whole. Under
            # ZeRO-3, DeepSpeed's memory-efficient F.linear saves differently and that
            # projection is recomputed too: the recompute, and HFU, are then slightly more
            flops -= count * 2 * length * intermediate * width
        return flops

    def encoder_layers(length):
        return video_layers(video.num_hidden_layers, length, video_width, video.intermediate_size)

    # the Conv3d patch embedding runs on every tube, masked ones are dropped after it
    flops = {"video_patch_embed": 2 * num_tubes * tube_pixels * video_width}
    flops["video_encoder"] = encoder_layers(num_visible)
    fusion_context = num_visible
    if num_masked and decoder:
        decoder_width = video.decoder_hidden_size
        flops["video_decoder"] = video_layers(
            video.decoder_num_hidden_layers,
            num_tubes,
            decoder_width,
            video.decoder_intermediate_size,
        )
        flops["video_decoder_projections"] = (
            2 * num_visible * video_width * decoder_width
            + 2 * num_masked * decoder_width * tube_pixels
        )
        if full_clip_for_contrastive:
            flops["video_patch_embed"] *= 2
            flops["video_encoder"] += encoder_layers(num_tubes)
            fusion_context = num_tubes

    text_passes = 1 if mlm_targets is None else 2  # captions, then masked captions
    flops["text_encoder"] = (
        text_passes
        * text.num_hidden_layers
        * layer_flops(text_length, text_width, text.intermediate_size)
    )
    # BertModel runs its pooler (one dense layer on the first token) in every pass; the model
    # keeps it for the export and does not use its output
    flops["text_pooler"] = text_passes * 2 * text_width * text_width
    flops["projections"] = 2 * (video_width + text_width) * config.embed_dim

    fusion_passes = (0 if mlm_targets is None else 1) + (2 if matching else 0)
    if fusion_passes:
        flops["fusion_video_projection"] = (
            fusion_passes * 2 * fusion_context * video_width * text_width
        )
        flops["fusion"] = (
            fusion_passes
            * config.fusion_num_layers
            * layer_flops(text_length, text_width, text.intermediate_size, context=fusion_context)
        )
    if mlm_targets is not None:
        per_target = 2 * text_width * text_width + 2 * text_width * text.vocab_size
        flops["mlm_head"] = mlm_targets * per_target
    if matching:
        flops["matching_head"] = 2 * 2 * text_width * 2
    if recomputed:
        return {name: value for name, value in flops.items() if name in CHECKPOINTED}
    return flops


def masked_tokens(config: PretrainConfig, caption_tokens: float | None = None) -> float | None:
    """Average masked tokens per caption (the MLM head's rows), None without MLM: the masking
    probability times the maskable tokens, a caption's real ones less [CLS] and [SEP].
    ``caption_tokens``: real tokens per caption, as a batch's attention mask counts them;
    None: ``data.max_text_length``, every caption filling it, an upper bound."""
    objectives = config.objectives
    if objectives.masked_language <= 0:
        return None
    tokens = config.data.max_text_length if caption_tokens is None else caption_tokens
    return objectives.mlm_probability * max(tokens - 2, 0.0)


def pretrain_forward_flops(
    config: PretrainConfig,
    model_config: VideoTextConfig | None = None,
    caption_tokens: float | None = None,
    *,
    recomputed: bool = False,
) -> dict[str, float]:
    """``forward_flops`` of one sample of a pretraining step with ``config``'s objectives on
    ``model_config`` (default: the config's own); ``caption_tokens`` as ``masked_tokens``.
    The text towers run on the padded length, ``data.max_text_length``, whatever the caption."""
    objectives = config.objectives
    return forward_flops(
        model_config or config.model.build_config(),
        config.data.max_text_length,
        mask_ratio=objectives.mask_ratio if objectives.masks_video else None,
        mlm_targets=masked_tokens(config, caption_tokens),
        matching=objectives.matching > 0,
        full_clip_for_contrastive=objectives.contrastive_on_unmasked,
        decoder=objectives.masked_video > 0,
        recomputed=recomputed,
    )


def training_flops(forward: dict[str, float]) -> float:
    """Model FLOPs of forward + backward per sample, what MFU counts: backward is about twice
    the forward."""
    return 3 * math.fsum(forward.values())


def hardware_flops(forward: dict[str, float], recomputed: dict[str, float]) -> float:
    """FLOPs the device runs per sample, what HFU counts: the model's and, with activation
    checkpointing, the ``recomputed`` forward (``forward_flops(..., recomputed=True)``)."""
    return training_flops(forward) + math.fsum(recomputed.values())
