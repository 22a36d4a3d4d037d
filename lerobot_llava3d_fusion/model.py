"""The llava3d_fusion network: prefix embedding, deep-fusion transformer and flow-matching head.

Inputs are already tensors (the policy turns LeRobot batches into them):
    images        list over cameras of (B, 3, H, W) float in [0, 1]
    geometry      list over cameras of CameraGeometry (None for a camera without 3D input)
    lang_tokens   (B, L) token ids, lang_mask (B, L) bool (right padding)
    state         (B, max_state_dim), actions / noise (B, chunk_size, max_action_dim)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .backbone import ImageEncoder
from .configuration_llava3d_fusion import Llava3DFusionConfig
from .depth_estimation import MonocularDepthEstimator
from .flow_matching import FlowMatchingActionExpert, sample_time
from .fusion import LLaVA3DWithActionExpertModel
from .geometry import DepthToPatchGeometry
from .vlm import load_backbone

# Patch grid side of the 3D-aware tokens handed to the expert (geometry_target="expert").
EXPERT_GEOMETRY_GRID = (4, 4)


@dataclass
class CameraGeometry:
    """What one camera contributes to 3D positions."""

    intrinsics: Tensor  # (B, 3, 3) for the depth image's pixel grid
    depth: Tensor | None = None  # (B, 1, H, W) metres; None = estimate it from the image
    extrinsics: Tensor | None = None  # (B, 4, 4) camera-to-world


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
            image_pooling=config.image_pooling,
            vision_tower_name=config.vision_tower_name,
            tiny_llm_type=config.tiny_llm_type,
            dtype=dtype,
        )
        self.image_encoder = ImageEncoder(
            backbone.vision_tower,
            backbone.projector,
            backbone.vision_feature_layer,
            backbone.vision_feature_select_strategy,
            feature_grid=backbone.feature_grid,
            pooling=backbone.image_pooling,
        ).to(dtype)
        self.image_size = backbone.image_size
        self.register_buffer(
            "image_mean", torch.tensor(backbone.image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("image_std", torch.tensor(backbone.image_std).view(1, 3, 1, 1), persistent=False)
        self.embed_tokens = backbone.language_model.embed_tokens
        self.fusion = LLaVA3DWithActionExpertModel(
            backbone.language_model,
            config.expert_mode,
            config.expert_width_multiplier,
            config.expert_mlp_multiplier,
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
        self.depth_estimator = (
            MonocularDepthEstimator(config.depth_estimator_name) if config.geometry == "estimator" else None
        )
        vlm_width = self.embed_tokens.embedding_dim
        if config.geometry == "none":
            self.patch_geometry = None
        elif config.geometry_target == "prefix":
            self.patch_geometry = DepthToPatchGeometry(
                vlm_width,
                backbone.patch_grid,
                max_depth=config.geometry_max_depth,
                gate_init=config.geometry_gate_init,
            ).to(dtype)
        else:
            expert_width = self.fusion.expert_width
            self.patch_geometry = DepthToPatchGeometry(
                expert_width,
                EXPERT_GEOMETRY_GRID,
                max_depth=config.geometry_max_depth,
                gate_init=config.geometry_gate_init,
            ).to(dtype)
            self.expert_patch_proj = nn.Linear(vlm_width, expert_width).to(dtype)
        self.patch_grid = backbone.patch_grid
        self.denoise_step = (
            torch.compile(self.fusion.forward_suffix, mode=config.compile_mode)
            if config.compile_model
            else self.fusion.forward_suffix
        )

    # --------------------------------------------------------------------------------- prefix

    def embed_images(self, images: list[Tensor]) -> list[Tensor]:
        """Cameras' (B, 3, H, W) images in [0, 1] -> per camera patch tokens (B, P, D)."""
        size = (self.image_size, self.image_size)
        pixels = torch.cat(
            [
                F.interpolate(img, size=size, mode="bilinear", align_corners=False)
                if img.shape[-2:] != size
                else img
                for img in images
            ]
        )  # (n_cameras * B, 3, S, S), camera-major: one vision-tower call for all cameras
        pixels = ((pixels - self.image_mean) / self.image_std).to(self.embed_tokens.weight.dtype)
        return list(self.image_encoder(pixels).chunk(len(images)))

    def camera_points_embedding(self, image: Tensor, geometry: CameraGeometry) -> Tensor:
        """Gated 3D-position embedding of one camera's patches: (B, P_geometry, D_geometry)."""
        depth = geometry.depth
        intrinsics = geometry.intrinsics
        if depth is None:
            depth, intrinsics = self.depth_estimator(image, intrinsics)
        return self.patch_geometry(depth, intrinsics, geometry.extrinsics)

    def embed_prefix(
        self,
        images: list[Tensor],
        geometry: list[CameraGeometry | None],
        lang_tokens: Tensor,
        lang_mask: Tensor,
        image_masks: list[Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> prefix tokens (B, Lp, D) = [image patches][task tokens], pad mask (B, Lp) bool, and the
        3D-aware patch tokens for the expert (B, Lg, D_expert) when geometry_target="expert".

        `image_masks`: per camera None (present) or (B,) bool, False where the camera is missing
        (`empty_cameras`): that camera's patch tokens are then masked out like padding."""
        patch_tokens = self.embed_images(images)
        expert_tokens = []
        for index, camera_geometry in enumerate(geometry):
            if camera_geometry is None:
                continue
            points = self.camera_points_embedding(images[index], camera_geometry)
            if self.config.geometry_target == "prefix":
                patch_tokens[index] = patch_tokens[index] + points
            else:
                expert_tokens.append(self.expert_patch_proj(self._pool_patches(patch_tokens[index])) + points)
        image_tokens = torch.cat(patch_tokens, dim=1)
        text_tokens = self.embed_tokens(lang_tokens)
        image_masks = image_masks or [None] * len(patch_tokens)
        image_mask = torch.cat(
            [
                lang_mask.new_ones(tokens.shape[:2], dtype=torch.bool)
                if valid is None
                else valid.bool()[:, None].expand(tokens.shape[:2])
                for tokens, valid in zip(patch_tokens, image_masks, strict=True)
            ],
            dim=1,
        )
        prefix = torch.cat([image_tokens, text_tokens], dim=1)
        prefix_mask = torch.cat([image_mask, lang_mask.bool()], dim=1)
        return prefix, prefix_mask, torch.cat(expert_tokens, dim=1) if expert_tokens else None

    def _pool_patches(self, tokens: Tensor) -> Tensor:
        """(B, gh * gw, D) patch tokens -> (B, 16, D) averaged onto the expert's coarse 4 x 4 grid."""
        batch, _, width = tokens.shape
        grid = tokens.transpose(1, 2).reshape(batch, width, *self.patch_grid)
        return F.adaptive_avg_pool2d(grid, EXPERT_GEOMETRY_GRID).flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------------------- training

    def forward(
        self,
        images,
        geometry,
        lang_tokens,
        lang_mask,
        state,
        actions,
        noise=None,
        time=None,
        image_masks=None,
    ) -> Tensor:
        """Element-wise flow-matching loss (B, H, A_max)."""
        cfg = self.config
        if noise is None:
            noise = torch.randn_like(actions)
        if time is None:
            time = sample_time(
                actions.shape[0],
                actions.device,
                cfg.time_sampling,
                cfg.time_sampling_beta_alpha,
                cfg.time_sampling_beta_beta,
                cfg.time_sampling_scale,
                cfg.time_sampling_offset,
            )
        prefix, prefix_mask, expert_context = self.embed_prefix(
            images, geometry, lang_tokens, lang_mask, image_masks
        )

        def transformer(suffix: Tensor) -> Tensor:
            return _without_context(
                self.fusion(prefix, prefix_mask, _with_context(expert_context, suffix)), expert_context
            )

        return self.action_expert.compute_loss(transformer, state, actions, noise, time)

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def sample_actions(
        self, images, geometry, lang_tokens, lang_mask, state, noise: Tensor, image_masks=None, **rtc_kwargs
    ) -> Tensor:
        """Actions (B, H, A_max) from noise (B, H, A_max) in `num_steps` Euler steps.

        `rtc_kwargs` (rtc_processor, rtc_enabled, inference_delay, prev_chunk_left_over,
        execution_horizon) go to the sampler's real-time-chunking guidance."""
        prefix, prefix_mask, expert_context = self.embed_prefix(
            images, geometry, lang_tokens, lang_mask, image_masks
        )
        context_length = 0 if expert_context is None else expert_context.shape[1]
        if self.config.use_cache:
            cache = self.fusion.forward_prefix(
                prefix, prefix_mask, context_length + self.action_expert.suffix_length
            )

            def transformer(suffix: Tensor) -> Tensor:
                return _without_context(
                    self.denoise_step(_with_context(expert_context, suffix), cache), expert_context
                )
        else:

            def transformer(suffix: Tensor) -> Tensor:
                return _without_context(
                    self.fusion(prefix, prefix_mask, _with_context(expert_context, suffix)), expert_context
                )

        return self.action_expert.sample_actions(
            transformer, state, noise, self.config.num_steps, **rtc_kwargs
        )


def _with_context(context: Tensor | None, suffix: Tensor) -> Tensor:
    """Prepend the expert's 3D-aware patch tokens (if any) to the suffix: (B, Lg + Ls, D_expert)."""
    return suffix if context is None else torch.cat([context.to(suffix.dtype), suffix], dim=1)


def _without_context(hidden: Tensor, context: Tensor | None) -> Tensor:
    return hidden if context is None else hidden[:, context.shape[1] :]
