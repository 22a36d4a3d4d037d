"""The llava3d_fusion network: prefix embedding, deep-fusion transformer and flow-matching head.

Inputs are already tensors (the policy turns LeRobot batches into them):
    images        list over cameras of (B, 3, H, W) float in [0, 1]
    lang_tokens   (B, L) token ids, lang_mask (B, L) bool (right padding)
    state         (B, max_state_dim), actions / noise (B, chunk_size, max_action_dim)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .configuration_llava3d_fusion import Llava3DFusionConfig
from .flow_matching import FlowMatchingActionExpert, sample_time
from .fusion import LLaVA3DWithActionExpertModel
from .vlm import ImageEncoder, load_backbone

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Llava3DFusionModel(nn.Module):
    def __init__(self, config: Llava3DFusionConfig):
        super().__init__()
        self.config = config
        dtype = DTYPES[config.dtype]
        backbone = load_backbone(
            config.vlm_model_name,
            load_weights=config.load_vlm_weights,
            num_layers=config.num_vlm_layers,
            tiny_llm_type=config.tiny_llm_type,
            dtype=dtype,
        )
        self.image_encoder = ImageEncoder(
            backbone.vision_tower,
            backbone.projector,
            backbone.vision_feature_layer,
            backbone.vision_feature_select_strategy,
        ).to(dtype)
        self.image_size = backbone.image_size
        self.register_buffer("image_mean", torch.tensor(backbone.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(backbone.image_std).view(1, 3, 1, 1), persistent=False)
        self.embed_tokens = backbone.language_model.embed_tokens
        self.fusion = LLaVA3DWithActionExpertModel(
            backbone.language_model, config.expert_mode, config.expert_width_multiplier
        )
        self.action_expert = FlowMatchingActionExpert(
            width=self.fusion.expert_width,
            chunk_size=config.chunk_size,
            max_state_dim=config.max_state_dim,
            max_action_dim=config.max_action_dim,
            use_state_token=config.use_state_token,
            min_period=config.min_period,
            max_period=config.max_period,
        ).to(dtype)

    # --------------------------------------------------------------------------------- prefix

    def embed_images(self, images: list[Tensor]) -> Tensor:
        """Cameras' (B, 3, H, W) images in [0, 1] -> patch tokens (B, n_cameras * P, D)."""
        batch = images[0].shape[0]
        size = (self.image_size, self.image_size)
        pixels = torch.cat(
            [F.interpolate(img, size=size, mode="bilinear", align_corners=False) if img.shape[-2:] != size else img
             for img in images]
        )  # (n_cameras * B, 3, S, S), camera-major
        pixels = ((pixels - self.image_mean) / self.image_std).to(self.embed_tokens.weight.dtype)
        tokens = self.image_encoder(pixels)  # (n_cameras * B, P, D)
        return tokens.view(len(images), batch, *tokens.shape[1:]).transpose(0, 1).flatten(1, 2)

    def embed_prefix(self, images: list[Tensor], lang_tokens: Tensor, lang_mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> prefix tokens (B, Lp, D) = [image patches][task tokens], pad mask (B, Lp) bool."""
        image_tokens = self.embed_images(images)
        text_tokens = self.embed_tokens(lang_tokens)
        image_mask = lang_mask.new_ones(image_tokens.shape[:2], dtype=torch.bool)
        return torch.cat([image_tokens, text_tokens], dim=1), torch.cat([image_mask, lang_mask.bool()], dim=1)

    # ------------------------------------------------------------------------------- training

    def forward(self, images, lang_tokens, lang_mask, state, actions, noise=None, time=None) -> Tensor:
        """Element-wise flow-matching loss (B, H, A_max)."""
        cfg = self.config
        if noise is None:
            noise = torch.randn_like(actions)
        if time is None:
            time = sample_time(
                actions.shape[0], actions.device, cfg.time_sampling, cfg.time_sampling_beta_alpha,
                cfg.time_sampling_beta_beta, cfg.time_sampling_scale, cfg.time_sampling_offset,
            )
        prefix, prefix_mask = self.embed_prefix(images, lang_tokens, lang_mask)

        def transformer(suffix: Tensor) -> Tensor:
            return self.fusion(prefix, prefix_mask, suffix)

        return self.action_expert.compute_loss(transformer, state, actions, noise, time)

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def sample_actions(self, images, lang_tokens, lang_mask, state, noise: Tensor) -> Tensor:
        """Actions (B, H, A_max) from noise (B, H, A_max) in `num_steps` Euler steps."""
        prefix, prefix_mask = self.embed_prefix(images, lang_tokens, lang_mask)
        if self.config.use_cache:
            cache = self.fusion.forward_prefix(prefix, prefix_mask, self.action_expert.suffix_length)

            def transformer(suffix: Tensor) -> Tensor:
                return self.fusion.forward_suffix(suffix, cache)
        else:

            def transformer(suffix: Tensor) -> Tensor:
                return self.fusion(prefix, prefix_mask, suffix)

        return self.action_expert.sample_actions(transformer, state, noise, self.config.num_steps)
