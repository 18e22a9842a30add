"""Video-text model for pretraining: VideoMAE video tower, BERT text tower, fusion, heads.

Shapes: B batch, T frames, C channels, H/W pixels, N = T'·H'·W' tubes (T' = T / tubelet_size,
H' = H / patch_size), Nv visible tubes, M masked tubes, L text tokens, E joint embedding size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertModel,
    PretrainedConfig,
    PreTrainedModel,
    VideoMAEConfig,
    VideoMAEModel,
)
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertIntermediate,
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertOutput,
    BertPooler,
)
from transformers.models.videomae.modeling_videomae import (
    VideoMAEDecoder,
    get_sinusoid_encoding_table,
)
from transformers.utils import ModelOutput
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pretrain.objectives import (
    IGNORE_INDEX,
    masked_language_loss,
    masked_video_loss,
    matching_loss,
    sample_hard_negatives,
)


class VideoTextConfig(PretrainedConfig):
    """Architecture of ``VideoTextModel``; sub-configs are plain VideoMAE and BERT configs.

    ``text_model_dir`` / ``video_model_dir`` name local transformers directories to start the
    towers from: when the matching sub-config is not given it is read from there, and
    ``VideoTextModel.from_towers`` loads the weights. A saved model keeps both sub-configs, so
    ``from_pretrained`` never needs the directories again.
    """

    model_type = "vidrec-video-text"
    sub_configs_defaults = {"video_config": VideoMAEConfig, "text_config": BertConfig}

    video_config: dict | VideoMAEConfig | None = None
    """VideoMAE fields: image_size, num_frames, tubelet_size, patch_size, hidden_size, decoder_*."""
    text_config: dict | BertConfig | None = None
    """BERT fields; the fusion layers and the MLM head use the same sizes."""
    video_model_dir: str | None = None
    """Local VideoMAE directory (``VideoMAEModel`` or ``VideoMAEForPreTraining``) to start from."""
    text_model_dir: str | None = None
    """Local BERT-family directory to start from (e.g. the packaged all-MiniLM-L6-v2)."""
    fusion_num_layers: int = 2
    """Layers in which text tokens attend to each other and to the video tokens."""
    embed_dim: int = 256
    """Size of the joint video-text embedding space."""
    text_pooling: str = "mean"
    """"mean" (over real tokens, as sentence-transformers trained MiniLM) or "cls"."""
    init_temperature: float = 0.07
    """Softmax temperature of the contrastive logits at initialization (CLIP)."""
    max_logit_scale: float = 100.0
    """Upper clamp of the learnable logit scale 1 / temperature (CLIP)."""
    use_matching_head: bool = False
    """Add the binary video-text matching head over the fused [CLS] token."""
    video_mean: tuple[float, ...] | list[float] = tuple(IMAGENET_DEFAULT_MEAN)
    """Per-channel mean of pixels in [0, 1], subtracted inside the model."""
    video_std: tuple[float, ...] | list[float] = tuple(IMAGENET_DEFAULT_STD)
    """Per-channel std of pixels in [0, 1]."""
    activation_checkpointing: bool = False
    """Recompute encoder, fusion and decoder layers in the backward pass to save memory."""
    initializer_range: float = 0.02
    """Std of the random init of the layers outside the two towers."""
    tie_word_embeddings: bool = True
    """MLM output matrix shares the text tower's word embeddings (BERT)."""

    def __post_init__(self, **kwargs):
        if self.text_model_dir is not None:
            self.text_model_dir = str(self.text_model_dir)
            if self.text_config is None:
                self.text_config = _load_sub_config(self.text_model_dir, BertConfig)
        if self.video_model_dir is not None:
            self.video_model_dir = str(self.video_model_dir)
            if self.video_config is None:
                self.video_config = _load_sub_config(self.video_model_dir, VideoMAEConfig)
        self.video_mean = list(self.video_mean)
        self.video_std = list(self.video_std)
        super().__post_init__(**kwargs)
        channels = self.video_config.num_channels
        if not len(self.video_mean) == len(self.video_std) == channels:
            raise ValueError(f"video_mean and video_std need {channels} values (num_channels)")
        if self.text_pooling not in ("mean", "cls"):
            raise ValueError(f"text_pooling must be 'mean' or 'cls', got {self.text_pooling!r}")
        if self.fusion_num_layers < 1:
            raise ValueError("fusion_num_layers must be >= 1 (MLM and matching read fused text)")
        if self.init_temperature <= 0 or 1 / self.init_temperature > self.max_logit_scale:
            raise ValueError("need 0 < 1 / init_temperature <= max_logit_scale")
        video = self.video_config
        image, patch = _pair(video.image_size), _pair(video.patch_size)
        if video.num_frames % video.tubelet_size or image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError("tubelet_size must divide num_frames, patch_size image_size")

    @property
    def video_grid(self) -> tuple[int, int, int]:
        """(T', H', W'): tubes along time, height and width."""
        video = self.video_config
        (height, width), (patch_h, patch_w) = _pair(video.image_size), _pair(video.patch_size)
        return video.num_frames // video.tubelet_size, height // patch_h, width // patch_w

    @classmethod
    def tiny(cls, **overrides) -> VideoTextConfig:
        """About 90k parameters for unit tests: 4 frames of 32 px, vocabulary 128, no dropout."""
        fields = dict(
            video_config=dict(
                image_size=32,
                num_frames=4,
                tubelet_size=2,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                decoder_hidden_size=32,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=64,
            ),
            text_config=dict(
                vocab_size=128,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=32,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            fusion_num_layers=1,
            embed_dim=16,
        )
        return cls(**(fields | overrides))

    @classmethod
    def small(cls, text_model_dir: str | Path | None = None, **overrides) -> VideoTextConfig:
        """CPU demo size: MiniLM text tower (384 wide) and a 6-layer 384-wide video ViT on
        8 frames of 112 px (4 x 7 x 7 = 196 tubes)."""
        from data_shards.text import resolve_text_model_dir

        fields = dict(
            text_model_dir=str(resolve_text_model_dir(text_model_dir)),
            video_config=dict(
                image_size=112,
                num_frames=8,
                tubelet_size=2,
                patch_size=16,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=6,
                intermediate_size=1536,
                decoder_hidden_size=192,
                decoder_num_hidden_layers=2,
                decoder_num_attention_heads=3,
                decoder_intermediate_size=768,
            ),
            fusion_num_layers=2,
            embed_dim=256,
        )
        return cls(**(fields | overrides))


def _pair(size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _load_sub_config(model_dir: str, expected: type[PretrainedConfig]) -> dict:
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if not isinstance(config, expected):
        raise ValueError(
            f"{model_dir} holds a {type(config).__name__}, expected a {expected.__name__}"
        )
    return config.to_dict()


@dataclass
class VideoTextOutput(ModelOutput):
    """What one pretraining forward returns; losses are None for objectives not requested."""

    video_embeds: torch.Tensor | None = None
    """(B, E) L2-normalized video embeddings (of the masked clip unless asked otherwise)."""
    text_embeds: torch.Tensor | None = None
    """(B, E) L2-normalized text embeddings of the unmasked captions."""
    logit_scale: torch.Tensor | None = None
    """() clamped 1 / temperature for the contrastive logits."""
    masked_video_loss: torch.Tensor | None = None
    masked_language_loss: torch.Tensor | None = None
    matching_loss: torch.Tensor | None = None


class FusionLayer(GradientCheckpointingLayer):
    """BERT block with cross-attention to video tokens, bidirectional over the text.

    ``BertLayer`` only accepts cross-attention as a causal decoder, so the same BERT modules are
    composed here without the causal mask. Submodule names match ``BertLayer``, so a text layer's
    weights load into everything but ``crossattention``.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        text_states: torch.Tensor,  # (B, L, D)
        video_states: torch.Tensor,  # (B, Nv, D)
        attention_mask: torch.Tensor | None = None,  # as built by create_bidirectional_mask
    ) -> torch.Tensor:
        text_states, _ = self.attention(text_states, attention_mask)
        # every video token is real (masked tubes were dropped), so no mask on the video side
        text_states, _ = self.crossattention(text_states, None, video_states)
        return self.output(self.intermediate(text_states), text_states)  # (B, L, D)


class VideoTextModel(PreTrainedModel):
    """Video and text towers with contrastive projections, video-conditioned MLM, matching head
    and a light VideoMAE decoder for masked video modelling.

    ``forward`` runs the video tower once on the tube-masked clip and serves both the masked
    video loss and the contrastive embedding from it; the contrastive loss itself needs the
    global batch and is left to ``objectives.ClipLoss``.
    """

    config: VideoTextConfig
    config_class = VideoTextConfig
    main_input_name = "video"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _tied_weights_keys = {
        "mlm_head.predictions.decoder.weight": "text_model.embeddings.word_embeddings.weight",
        "mlm_head.predictions.decoder.bias": "mlm_head.predictions.bias",
    }

    def __init__(self, config: VideoTextConfig):
        super().__init__(config)
        video_config, text_config = config.video_config, config.text_config
        video_width, text_width = video_config.hidden_size, text_config.hidden_size

        self.video_model = VideoMAEModel(video_config)
        # VideoMAE built for mean pooling has no final norm; tokens feed pooling, fusion, decoder
        self.video_norm = nn.LayerNorm(video_width, eps=video_config.layer_norm_eps)
        self.text_model = BertModel(text_config, add_pooling_layer=False)  # pooler: see below

        self.video_projection = nn.Linear(video_width, config.embed_dim)
        self.text_projection = nn.Linear(text_width, config.embed_dim)
        # Shape (1,), not a scalar: DeepSpeed's parameter broadcast cannot view 0-d tensors.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / config.init_temperature)]))

        self.video_to_fusion = nn.Linear(video_width, text_width)
        self.fusion_layers = nn.ModuleList(
            FusionLayer(text_config) for _ in range(config.fusion_num_layers)
        )
        self.mlm_head = BertOnlyMLMHead(text_config)
        self.matching_head = nn.Linear(text_width, 2) if config.use_matching_head else None

        decoder_width = video_config.decoder_hidden_size
        self.encoder_to_decoder = nn.Linear(video_width, decoder_width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        # fixed sin-cos table, a plain tensor as in VideoMAE (not saved, moved per forward)
        self.decoder_position_embeddings = get_sinusoid_encoding_table(
            math.prod(config.video_grid), decoder_width
        )  # (1, N, Dd)
        self.decoder = VideoMAEDecoder(video_config)

        self.post_init()
        # The text pooler is never used (text embeddings pool the tokens), but kept and frozen:
        # the exported text_encoder/ is then a whole BertModel (AutoModel reports nothing
        # MISSING) and a MiniLM start loads every tensor of its checkpoint (nothing UNEXPECTED).
        # Added last, its random init drawn from a forked RNG: every other weight of a seeded
        # model is the one it was without the pooler.
        with torch.random.fork_rng(devices=[]):
            self.text_model.pooler = BertPooler(text_config)
            self._init_weights(self.text_model.pooler.dense)
        self.text_model.pooler.requires_grad_(False)
        if config.activation_checkpointing:
            self.activation_checkpointing_enable()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VideoTextModel):
            init.normal_(module.mask_token, std=self.config.initializer_range)
            init.constant_(module.logit_scale, math.log(1 / self.config.init_temperature))
        elif isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)

    @classmethod
    def from_towers(cls, config: VideoTextConfig) -> VideoTextModel:
        """New model whose towers start from ``config.text_model_dir`` / ``video_model_dir``.

        Everything else is random, except that the fusion layers start from the top text layers
        (self-attention and feed-forward; cross-attention stays random), as ALBEF does.
        Not done in ``__init__``: ``from_pretrained`` builds the model on the meta device.
        """
        model = cls(config)
        if config.text_model_dir is not None:
            text_model = BertModel.from_pretrained(
                config.text_model_dir, config=config.text_config, local_files_only=True
            )
            model.text_model.load_state_dict(text_model.state_dict())
            top_layers = text_model.encoder.layer[-config.fusion_num_layers :]
            for fusion_layer, text_layer in zip(model.fusion_layers, top_layers, strict=False):
                result = fusion_layer.load_state_dict(text_layer.state_dict(), strict=False)
                if result.unexpected_keys:  # a BERT variant whose layers are named differently
                    raise ValueError(f"text layer keys unknown to fusion: {result.unexpected_keys}")
        if config.video_model_dir is not None:
            video_model = VideoMAEModel.from_pretrained(
                config.video_model_dir, config=config.video_config, local_files_only=True
            )
            model.video_model.load_state_dict(video_model.state_dict())
        return model

    # ------------------------------------------------------------------ video

    def prepare_video(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (or float in [0, 1]) (B, T, C, H, W) → (pixels in [0, 1] float32, model input).

        The model input is mean/std-normalized and cast to the weights' dtype (bf16 under
        DeepSpeed); the float32 pixels serve as reconstruction targets.
        """
        frames = video.float() / 255 if video.dtype == torch.uint8 else video.float()
        mean = torch.tensor(self.config.video_mean, device=video.device)[:, None, None]
        std = torch.tensor(self.config.video_std, device=video.device)[:, None, None]
        dtype = self.video_model.embeddings.patch_embeddings.projection.weight.dtype
        return frames, ((frames - mean) / std).to(dtype)

    def _video_tokens(
        self, pixels: torch.Tensor, bool_masked_pos: torch.Tensor | None
    ) -> torch.Tensor:
        if bool_masked_pos is not None:
            bool_masked_pos = bool_masked_pos.to(pixels.device)
        tokens = self.video_model(pixels, bool_masked_pos=bool_masked_pos).last_hidden_state
        return self.video_norm(tokens)  # (B, Nv, Dv)

    def _video_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        # every token here is visible (masked tubes never entered the encoder)
        return F.normalize(self.video_projection(tokens.mean(dim=1)), dim=-1)  # (B, E)

    def encode_video(
        self, video: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C, H, W) uint8 → (tokens (B, Nv, Dv), normalized embedding (B, E)).

        ``bool_masked_pos`` (B, N), True = masked, same count per sample: only visible tubes
        are encoded.
        """
        _, pixels = self.prepare_video(video)
        tokens = self._video_tokens(pixels, bool_masked_pos)
        return tokens, self._video_embedding(tokens)

    def reconstruct(self, tokens: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Decoder predictions for the masked tubes: (B, M, ts·p·p·C), in tube index order."""
        hidden = self.encoder_to_decoder(tokens)  # (B, Nv, Dd)
        batch, _, width = hidden.shape
        positions = self.decoder_position_embeddings.to(hidden).expand(batch, -1, -1)  # (B, N, Dd)
        bool_masked_pos = bool_masked_pos.to(hidden.device)
        visible_positions = positions[~bool_masked_pos].view(batch, -1, width)  # (B, Nv, Dd)
        masked_positions = positions[bool_masked_pos].view(batch, -1, width)  # (B, M, Dd)
        hidden = torch.cat(
            [hidden + visible_positions, self.mask_token.to(hidden) + masked_positions], dim=1
        )  # (B, N, Dd): visible first, the decoder returns the last M (the masked ones)
        return self.decoder(hidden, masked_positions.shape[1]).logits

    # ------------------------------------------------------------------ text

    def _text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids, attention_mask=attention_mask).last_hidden_state

    def pool_text(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, Dt) text tokens → (B, Dt) sentence features, before the joint projection."""
        if self.config.text_pooling == "cls":
            return tokens[:, 0]
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def _text_embedding(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.pool_text(tokens, attention_mask)
        return F.normalize(self.text_projection(pooled), dim=-1)  # (B, E)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids and mask → (tokens (B, L, Dt), normalized embedding (B, E))."""
        tokens = self._text_tokens(input_ids, attention_mask)
        return tokens, self._text_embedding(tokens, attention_mask)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask → (B, Dt) pooled sentence features (``encode_text`` projects
        and normalizes these into the joint space)."""
        return self.pool_text(self._text_tokens(input_ids, attention_mask), attention_mask)

    def fuse(
        self,
        text_tokens: torch.Tensor,  # (B, L, Dt)
        attention_mask: torch.Tensor,  # (B, L)
        video_tokens: torch.Tensor,  # (B, Nv, Dv)
    ) -> torch.Tensor:
        """Text tokens after attending to each other and to the video: (B, L, Dt)."""
        video_states = self.video_to_fusion(video_tokens)  # (B, Nv, Dt)
        mask = create_bidirectional_mask(
            config=self.config.text_config, inputs_embeds=text_tokens, attention_mask=attention_mask
        )
        hidden = text_tokens
        for layer in self.fusion_layers:
            hidden = layer(hidden, video_states, mask)
        return hidden

    @property
    def logit_scale_value(self) -> torch.Tensor:
        """1 / temperature, clamped to ``max_logit_scale`` (no gradient beyond the clamp)."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    # ------------------------------------------------------------------ pretraining

    def forward(
        self,
        video: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        video_text_matching: bool = False,
        full_clip_for_contrastive: bool = False,
        reconstruct: bool = True,
    ) -> VideoTextOutput:
        """Embeddings and the local losses of one pretraining step.

        video (B, T, C, H, W) uint8; input_ids / attention_mask (B, L) unmasked captions.
        bool_masked_pos (B, N) tube mask → masked video loss, and the same masked forward gives
        the contrastive embedding and the fusion tokens unless ``full_clip_for_contrastive``
        (then the whole clip is encoded a second time for those). mlm_input_ids / mlm_labels
        (B, L) from ``objectives.mask_tokens`` → MLM loss. ``video_text_matching`` → matching
        loss with one in-batch hard negative video per caption. ``reconstruct`` False: the
        masked clip serves the contrastive embedding only (no decoder, no masked video loss).
        """
        frames, pixels = self.prepare_video(video)
        video_tokens = self._video_tokens(pixels, bool_masked_pos)  # (B, Nv, Dv)

        video_loss = None
        if bool_masked_pos is not None and reconstruct:
            predictions = self.reconstruct(video_tokens, bool_masked_pos)  # (B, M, ts·p·p·C)
            video_loss = masked_video_loss(
                predictions,
                frames,
                bool_masked_pos.to(video.device),
                self.config.video_config.tubelet_size,
                self.config.video_config.patch_size,
            )
            if full_clip_for_contrastive:
                video_tokens = self._video_tokens(pixels, None)  # (B, N, Dv)
        video_embeds = self._video_embedding(video_tokens)
        text_tokens, text_embeds = self.encode_text(input_ids, attention_mask)

        language_loss = None
        if mlm_labels is not None:
            if mlm_input_ids is None:
                raise ValueError("mlm_labels given without mlm_input_ids")
            masked_text = self._text_tokens(mlm_input_ids, attention_mask)  # (B, L, Dt)
            fused = self.fuse(masked_text, attention_mask, video_tokens)
            # the vocabulary projection only where there is a target (~15% of tokens)
            targets = mlm_labels != IGNORE_INDEX
            language_loss = masked_language_loss(self.mlm_head(fused[targets]), mlm_labels[targets])

        pair_loss = None
        if video_text_matching:
            pair_loss = self._matching_loss(
                text_tokens, attention_mask, video_tokens, text_embeds @ video_embeds.T
            )

        return VideoTextOutput(
            video_embeds=video_embeds,
            text_embeds=text_embeds,
            logit_scale=self.logit_scale_value,
            masked_video_loss=video_loss,
            masked_language_loss=language_loss,
            matching_loss=pair_loss,
        )

    def _matching_loss(
        self,
        text_tokens: torch.Tensor,  # (B, L, Dt)
        attention_mask: torch.Tensor,  # (B, L)
        video_tokens: torch.Tensor,  # (B, Nv, Dv)
        text_to_video: torch.Tensor,  # (B, B) similarity
    ) -> torch.Tensor:
        if self.matching_head is None:
            raise ValueError("video_text_matching needs a model built with use_matching_head")
        negatives = sample_hard_negatives(text_to_video)  # (B,) a non-matching video per caption
        batch = text_tokens.shape[0]
        fused = self.fuse(
            torch.cat([text_tokens, text_tokens]),
            torch.cat([attention_mask, attention_mask]),
            torch.cat([video_tokens, video_tokens[negatives]]),
        )  # (2B, L, Dt): B matching pairs, then B mismatched
        logits = self.matching_head(fused[:, 0])  # (2B, 2) from the fused [CLS]
        labels = torch.cat([torch.ones(batch), torch.zeros(batch)]).long().to(logits.device)
        return matching_loss(logits, labels)


AutoConfig.register(VideoTextConfig.model_type, VideoTextConfig, exist_ok=True)
AutoModel.register(VideoTextConfig, VideoTextModel, exist_ok=True)
