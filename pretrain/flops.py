"""Matmul FLOPs of a pretraining step, counted from the config (for throughput and MFU).

Counts 2 FLOPs per multiply-add of every matrix product (linear layers, convolution,
attention scores and mixing); norms, softmax and elementwise work are left out, as usual.
tests/test_model.py checks the count against ``torch.utils.flop_counter`` on eager attention.
"""

from __future__ import annotations

import math

from pretrain.model import VideoTextConfig


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
) -> dict[str, float]:
    """Forward FLOPs per sample of ``VideoTextModel.forward``, by component.

    ``mask_ratio`` None: no masked video modelling (whole clip encoded once). ``mlm_targets``:
    average masked tokens per caption (about mlm_probability x real tokens), None: no MLM.
    """
    video, text = config.video_config, config.text_config
    num_time, height, width = config.video_grid
    num_tubes = num_time * height * width
    tube_pixels = video.num_channels * video.tubelet_size * video.patch_size**2
    num_masked = 0 if mask_ratio is None else num_time * int(mask_ratio * height * width)
    num_visible = num_tubes - num_masked
    video_width, text_width = video.hidden_size, text.hidden_size

    def video_encoder(length):
        # the Conv3d patch embedding runs on every tube, masked ones are dropped after it
        embed = 2 * num_tubes * tube_pixels * video_width
        return embed + video.num_hidden_layers * layer_flops(
            length, video_width, video.intermediate_size
        )

    flops = {"video_encoder": video_encoder(num_visible)}
    fusion_context = num_visible
    if num_masked:
        decoder_width = video.decoder_hidden_size
        flops["video_decoder"] = (
            2 * num_visible * video_width * decoder_width
            + video.decoder_num_hidden_layers
            * layer_flops(num_tubes, decoder_width, video.decoder_intermediate_size)
            + 2 * num_masked * decoder_width * tube_pixels
        )
        if full_clip_for_contrastive:
            flops["video_encoder"] += video_encoder(num_tubes)
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
    fusion_pass = 2 * fusion_context * video_width * text_width + config.fusion_num_layers * (
        layer_flops(text_length, text_width, text.intermediate_size, context=fusion_context)
    )
    if fusion_passes:
        flops["fusion"] = fusion_passes * fusion_pass
    if mlm_targets is not None:
        per_target = 2 * text_width * text_width + 2 * text_width * text.vocab_size
        flops["mlm_head"] = mlm_targets * per_target
    if matching:
        flops["matching_head"] = 2 * 2 * text_width * 2
    return flops


def training_flops(forward: dict[str, float], activation_checkpointing: bool = False) -> float:
    """FLOPs of forward + backward per sample: backward is about twice the forward, and
    activation checkpointing runs the forward of the checkpointed layers once more."""
    total = math.fsum(forward.values())
    return total * (4 if activation_checkpointing else 3)
