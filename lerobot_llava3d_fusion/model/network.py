"""The llava3d_fusion network: prefix embedding, deep-fusion transformer and flow-matching head.

Inputs are already tensors, gathered in a `ModelInputs` (the policy turns LeRobot batches into it):
images per camera, their depth and camera matrices (`CameraGeometry`), the tokenized task, the padded
state and which cameras are present; actions and noise are (B, chunk_size, max_action_dim).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lerobot_llava3d_fusion.backbones.backbone import Backbone, ImageEncoder
from lerobot_llava3d_fusion.backbones.files import BackboneSource
from lerobot_llava3d_fusion.backbones.llava3d import LLAVA3D_POSITION_PREFIX, load_llava3d_position_mlp
from lerobot_llava3d_fusion.backbones.loading import load_backbone
from lerobot_llava3d_fusion.configuration_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.geometry.llava3d_encoder import Llava3DGeometryEncoder, voxel_pool
from lerobot_llava3d_fusion.geometry.patch_points import DepthToPatchPoints, SinusoidalGeometryEncoder
from lerobot_llava3d_fusion.model.flow_matching import FlowMatchingActionExpert, sample_time
from lerobot_llava3d_fusion.model.fusion import LLaVA3DWithActionExpertModel

logger = logging.getLogger(__name__)

# Patch grid side of the 3D-aware tokens handed to the expert (geometry_target="expert").
EXPERT_3D_TOKEN_GRID = (4, 4)


@dataclass
class CameraGeometry:
    """One camera's depth and camera matrices: what its 3D points are computed from."""

    intrinsics: Tensor  # (B, 3, 3) for the depth image's pixel grid
    depth: Tensor | None = None  # (B, 1, H, W) metres; None = estimate it from the image
    extrinsics: Tensor | None = None  # (B, 4, 4) camera-to-world
    origin: Tensor | None = None  # (B, 3) world point the 3D points are measured from; None: the world origin


class ModelInputs(NamedTuple):
    """Everything the network reads of one batch (the policy builds it from a LeRobot batch)."""

    images: list[Tensor]  # per camera (B, 3, H, W) in [0, 1]
    camera_geometry: list[CameraGeometry | None]  # per camera; None: no 3D points for that camera
    lang_tokens: Tensor  # (B, L)
    lang_mask: Tensor  # (B, L) bool, right padding
    state: Tensor  # (B, max_state_dim)
    camera_present: list[Tensor | None]  # per camera None (present) or (B,) bool, False = empty camera


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Llava3DFusionModel(nn.Module):
    """The network. Mixed precision: pretrained weights load in `config.dtype` (memory), new modules
    are built in float32; the policy then decides each parameter's storage dtype (float32 master
    weights for everything that trains) and `compute_precision()` runs the forward in `config.dtype`.

    Parts, built in this order (the attribute names are the checkpoints' state-dict keys):
    `image_encoder` (vision tower + projector), `embed_tokens` + `fusion` (the LLM's layers fused with
    the action expert's), `action_expert` (flow-matching heads: state, noisy actions, time, velocity),
    `depth_estimator` (the network the geometry source runs for depth, if any), `geometry_encoder` (the
    3D point encoder) and `expert_patch_proj` (only for geometry_target="expert").
    """

    def __init__(self, config: Llava3DFusionConfig, backbone_source: BackboneSource | None = None):
        super().__init__()
        self.config = config
        self.backbone_source = backbone_source or BackboneSource.from_config(config)
        backbone = self._load_backbone()
        self.tokenizer = backbone.tokenizer
        self._build_vision(backbone)
        self._build_fusion(backbone)
        self.action_expert = self._build_action_expert()
        self.depth_estimator = config.geometry_source.build_depth_model(config)
        self._build_3d_encoder(backbone)
        self.denoise_step = self._build_denoise_step()

    # ------------------------------------------------------------------------------ building

    def _load_backbone(self) -> Backbone:
        """Vision tower, projector, LLM and tokenizer of the configured checkpoint (or the tiny one)."""
        config = self.config
        return load_backbone(
            self.backbone_source.vlm,
            load_weights=config.load_vlm_weights,
            num_layers=config.num_vlm_layers,
            image_pooling=config.image_pooling,
            vision_tower_name=self.backbone_source.vision_tower,
            tiny_llm_type=config.tiny_llm_type,
            dtype=TORCH_DTYPES[config.dtype],
        )

    def _build_vision(self, backbone: Backbone) -> None:
        """`image_encoder` (tower features -> projected patch tokens), the tower's input size and
        normalisation, and the patch grid of the projected tokens."""
        self.image_encoder = ImageEncoder.of(backbone)
        self.image_size = backbone.image_size
        self.register_buffer(
            "image_mean", torch.tensor(backbone.image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("image_std", torch.tensor(backbone.image_std).view(1, 3, 1, 1), persistent=False)
        self.patch_grid = backbone.patch_grid

    def _build_fusion(self, backbone: Backbone) -> None:
        """`embed_tokens` (the LLM's) and `fusion`: the LLM's layers joined with the action expert's."""
        config = self.config
        self.embed_tokens = backbone.language_model.embed_tokens
        self.fusion = LLaVA3DWithActionExpertModel(
            backbone.language_model,
            config.expert_mode,
            config.expert_width_multiplier,
            config.expert_mlp_multiplier,
        )
        if self.fusion.expert_width % 2:
            llm_width = self.embed_tokens.embedding_dim
            raise ValueError(
                f"expert_width_multiplier={config.expert_width_multiplier} gives the action expert an odd width "
                f"({self.fusion.expert_width} of the LLM's {llm_width}); the sinusoidal time embedding needs an "
                f"even one: e.g. expert_width_multiplier={2 * round(config.expert_width_multiplier * llm_width / 2) / llm_width:g}."
            )

    def _build_action_expert(self) -> FlowMatchingActionExpert:
        """The suffix's heads on the expert's width: state, noisy actions and time in, velocity out."""
        config = self.config
        return FlowMatchingActionExpert(
            width=self.fusion.expert_width,
            chunk_size=config.chunk_size,
            action_dim=config.action_feature.shape[-1],
            max_state_dim=config.max_state_dim,
            max_action_dim=config.max_action_dim,
            use_state_token=config.use_state_token,
            min_period=config.min_period,
            max_period=config.max_period,
        )

    def _build_3d_encoder(self, backbone: Backbone) -> None:
        """What turns cameras' metric depth into 3D-aware tokens: the 3D point encoder (`geometry_encoder`,
        None when the geometry source gives no points) and, when the 3D-aware tokens go to the expert,
        their projection to its width (`expert_patch_proj`)."""
        config = self.config
        source = config.geometry_source
        # The encoder (README "Geometry"): LLaVA-3D's position MLP by default for its own checkpoints.
        self.geometry_encoder_kind = config.geometry_encoder or (
            "llava3d_mlp" if backbone.is_llava3d else "sinusoidal"
        )
        # LLaVA-3D's own position MLP is part of its pretrained VLM (ungated); any other encoder is new.
        self.geometry_encoder_is_pretrained = (
            backbone.is_llava3d and self.geometry_encoder_kind == "llava3d_mlp"
        )
        if backbone.position_encoder_state is not None and (
            not source.needs_3d_encoder or self.geometry_encoder_kind != "llava3d_mlp"
        ):
            reason = (
                f"geometry={config.geometry!r}"
                if not source.needs_3d_encoder
                else f"geometry_encoder={self.geometry_encoder_kind!r}"
            )
            logger.warning(
                "%s: the checkpoint's 3D position encoder (%s*) is unused with %s.",
                config.vlm_model_name,
                LLAVA3D_POSITION_PREFIX,
                reason,
            )
        if not source.needs_3d_encoder:
            self.geometry_encoder = None
            return
        self.geometry_encoder = self._build_point_encoder(backbone)
        if config.geometry_target == "expert":
            self.expert_patch_proj = nn.Linear(self.embed_tokens.embedding_dim, self.fusion.expert_width)

    def _build_point_encoder(self, backbone: Backbone) -> DepthToPatchPoints:
        """Depth -> per-patch points -> vectors, on the grid and width where they are added."""
        config = self.config
        patch_point_method = config.geometry_patch_points or (
            "nearest" if self.geometry_encoder_kind == "llava3d_mlp" else "mean"
        )
        if self.geometry_encoder_kind == "llava3d_mlp":
            if config.geometry_samples_per_patch_side > 1:
                raise ValueError(
                    f"{config.vlm_model_name} uses LLaVA-3D's position MLP (one point per patch): "
                    "geometry_samples_per_patch_side > 1 needs geometry_encoder='sinusoidal'."
                )
            # On the tower's own grid and width: the term is added before the projector (and its pooling).
            encoder = Llava3DGeometryEncoder(
                backbone.feature_width,
                backbone.feature_grid,
                gated=not backbone.is_llava3d,
                gate_init=config.geometry_gate_init,
                patch_point_method=patch_point_method,
                max_depth=config.geometry_max_depth,
            )
            load_llava3d_position_mlp(encoder.position_mlp, backbone, config)
            return encoder
        # Sinusoidal: added to the projected patch tokens (LLM width, patch grid), or to the expert's
        # pooled 3D-aware tokens (expert width, coarse grid).
        to_expert = config.geometry_target == "expert"
        return SinusoidalGeometryEncoder(
            self.fusion.expert_width if to_expert else self.embed_tokens.embedding_dim,
            EXPERT_3D_TOKEN_GRID if to_expert else backbone.patch_grid,
            max_depth=config.geometry_max_depth,
            gate_init=config.geometry_gate_init,
            patch_point_method=patch_point_method,
            samples_per_side=config.geometry_samples_per_patch_side,
        )

    def _build_denoise_step(self) -> Callable[..., Tensor]:
        """The cached suffix pass run at every Euler step, compiled when `compile_model`."""
        if self.config.compile_model:
            return torch.compile(self.fusion.forward_suffix, mode=self.config.compile_mode)
        return self.fusion.forward_suffix

    def compute_precision(self) -> AbstractContextManager:
        """Autocast to `config.dtype` (bf16 matmuls over float32 master weights; norms, softmax, the
        residual streams of both prefix and suffix and the Euler integration stay float32), or nothing
        for float32, leaving any outer autocast alone. The float32 suffix stream cut the bf16 action
        error by a fifth to a quarter (tiny model: mean 0.0018 -> 0.0015 against float32 compute)."""
        if self.config.dtype == "float32":
            return nullcontext()
        return torch.autocast(self.embed_tokens.weight.device.type, dtype=TORCH_DTYPES[self.config.dtype])

    # --------------------------------------------------------------------------------- prefix

    def embed_images(self, images: list[Tensor]) -> list[Tensor]:
        """Cameras' (B, 3, H, W) images in [0, 1] -> per camera patch tokens (B, P, D)."""
        return [self.image_encoder.project(features) for features in self.image_features(images)]

    def image_features(self, images: list[Tensor]) -> list[Tensor]:
        """Cameras' (B, 3, H, W) images in [0, 1] -> per camera tower features (B, P_tower, C)."""
        size = (self.image_size, self.image_size)
        pixels = torch.cat(
            [
                F.interpolate(img, size=size, mode="bilinear", align_corners=False)
                if img.shape[-2:] != size
                else img
                for img in images
            ]
        )  # (n_cameras * B, 3, S, S), camera-major: one vision-tower call for all cameras
        pixels = (pixels - self.image_mean) / self.image_std
        return list(self.image_encoder.features(pixels).chunk(len(images)))

    def camera_patch_points(self, image: Tensor, camera: CameraGeometry) -> tuple[Tensor, Tensor]:
        """One camera's per-patch 3D points (B, P_3d, 3) and their validity (B, P_3d), from the metric
        depth its geometry source gives (recorded, or estimated from `image`)."""
        depth, intrinsics = self.config.geometry_source.metric_depth(image, camera, self.depth_estimator)
        points, valid = self.geometry_encoder.patch_points_of(depth, intrinsics, camera.extrinsics)
        if camera.origin is not None:  # (B, 3) -> broadcast over the patch (and sample) dims
            origin_shape = (points.shape[0],) + (1,) * (points.ndim - 2) + (3,)
            points = points - camera.origin.to(points.dtype).reshape(origin_shape)
        return points, valid

    def embed_prefix(
        self,
        images: list[Tensor],
        camera_geometry: list[CameraGeometry | None],
        lang_tokens: Tensor,
        lang_mask: Tensor,
        camera_present: list[Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> prefix tokens (B, Lp, D) = [image patches][task tokens], pad mask (B, Lp) bool, and the
        3D-aware patch tokens for the expert (B, Lg, D_expert) when geometry_target="expert".

        With voxel pooling the image part is [patches of cameras without 3D][voxel tokens of all
        cameras with 3D, padded to the batch's longest]; the pad mask hides the padding.
        `camera_present`: per camera None (present) or (B,) bool, False where the camera is missing
        (`empty_cameras`): that camera's patch tokens are then masked out like padding.
        """
        camera_present = camera_present or [None] * len(images)
        features = self.image_features(images)  # per camera (B, P_tower, C)
        llava3d = self.geometry_encoder_kind == "llava3d_mlp"
        voxel_size = self.config.geometry_voxel_size
        image_tokens, token_masks, expert_tokens, voxel_inputs = [], [], [], []

        def add_camera_tokens(index: int, tokens: Tensor) -> None:
            present = camera_present[index]
            image_tokens.append(tokens)
            token_masks.append(
                lang_mask.new_ones(tokens.shape[:2], dtype=torch.bool)
                if present is None
                else present.bool()[:, None].expand(tokens.shape[:2])
            )

        for index, camera in enumerate(camera_geometry):
            camera_features = features[index]
            if camera is None:
                add_camera_tokens(index, self.image_encoder.project(camera_features))
                continue
            points, valid = self.camera_patch_points(images[index], camera)
            if llava3d:  # LLaVA-3D: tower features + MLP(xyz), then the projector
                features_3d = camera_features + self.geometry_encoder.position_mlp(points, valid).to(
                    camera_features.dtype
                )
                if voxel_size is not None:
                    voxel_inputs.append((features_3d, points, valid))
                elif self.config.geometry_target == "prefix":
                    add_camera_tokens(index, self.image_encoder.project(features_3d))
                else:
                    add_camera_tokens(index, self.image_encoder.project(camera_features))
                    expert_tokens.append(
                        self.expert_patch_proj(self._pool_patches(self.image_encoder.project(features_3d)))
                    )
            elif voxel_size is not None:  # sinusoidal, added after the projector to the voxel tokens
                voxel_inputs.append((camera_features, points, valid))
            else:  # sinusoidal: projector, then the gated encoding
                tokens = self.image_encoder.project(camera_features)
                embedding = self.geometry_encoder.position_mlp(points, valid)
                if self.config.geometry_target == "prefix":
                    add_camera_tokens(index, tokens + embedding)
                else:
                    add_camera_tokens(index, tokens)
                    expert_tokens.append(self.expert_patch_proj(self._pool_patches(tokens)) + embedding)
        if voxel_inputs:
            voxels = voxel_pool(*(torch.cat(parts, dim=1) for parts in zip(*voxel_inputs)), voxel_size)
            tokens = self.image_encoder.projector(voxels.features)  # (B, V, D); image_pooling is 1
            if not llava3d:
                tokens = tokens + self.geometry_encoder.position_mlp(voxels.points, voxels.valid)
            image_tokens.append(tokens)
            token_masks.append(voxels.mask)
        text_tokens = self.embed_tokens(lang_tokens)
        prefix = torch.cat([*image_tokens, text_tokens], dim=1).float()  # float32 residual stream
        prefix_mask = torch.cat([*token_masks, lang_mask.bool()], dim=1)
        return prefix, prefix_mask, torch.cat(expert_tokens, dim=1) if expert_tokens else None

    def _pool_patches(self, tokens: Tensor) -> Tensor:
        """(B, gh * gw, D) patch tokens -> (B, 16, D) averaged onto the expert's coarse 4 x 4 grid."""
        batch, _, width = tokens.shape
        grid = tokens.transpose(1, 2).reshape(batch, width, *self.patch_grid)
        return F.adaptive_avg_pool2d(grid, EXPERT_3D_TOKEN_GRID).flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------------------- training

    def forward(
        self, inputs: ModelInputs, actions: Tensor, noise: Tensor | None = None, time: Tensor | None = None
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
                *cfg.time_sampling_range,
            )
        with self.compute_precision():
            prefix = self.embed_prefix(
                inputs.images,
                inputs.camera_geometry,
                inputs.lang_tokens,
                inputs.lang_mask,
                inputs.camera_present,
            )
            return self.action_expert.compute_loss(
                self._joint_transformer(*prefix), inputs.state, actions, noise, time
            )

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def sample_actions(self, inputs: ModelInputs, noise: Tensor, **rtc_kwargs) -> Tensor:
        """Actions (B, H, A_max) from noise (B, H, A_max) in `num_steps` Euler steps.

        `rtc_kwargs` (rtc_processor, rtc_enabled, inference_delay, prev_chunk_left_over,
        execution_horizon) go to the sampler's real-time-chunking guidance."""
        with self.compute_precision():
            prefix, prefix_mask, expert_context = self.embed_prefix(
                inputs.images,
                inputs.camera_geometry,
                inputs.lang_tokens,
                inputs.lang_mask,
                inputs.camera_present,
            )
            if self.config.use_cache:
                context_length = 0 if expert_context is None else expert_context.shape[1]
                cache = self.fusion.forward_prefix(
                    prefix, prefix_mask, context_length + self.action_expert.suffix_length
                )

                def transformer(suffix: Tensor) -> Tensor:
                    return _without_context(
                        self.denoise_step(_with_context(expert_context, suffix), cache), expert_context
                    )
            else:
                transformer = self._joint_transformer(prefix, prefix_mask, expert_context)
            return self.action_expert.sample_actions(
                transformer, inputs.state, noise, self.config.num_steps, **rtc_kwargs
            )

    def _joint_transformer(self, prefix: Tensor, prefix_mask: Tensor, expert_context: Tensor | None):
        """The suffix transformer that runs prefix and suffix jointly (training, uncached sampling)."""

        def transformer(suffix: Tensor) -> Tensor:
            return _without_context(
                self.fusion(prefix, prefix_mask, _with_context(expert_context, suffix)), expert_context
            )

        return transformer


def _with_context(context: Tensor | None, suffix: Tensor) -> Tensor:
    """Prepend the expert's 3D-aware patch tokens (if any) to the suffix: (B, Lg + Ls, D_expert)."""
    return suffix if context is None else torch.cat([context.to(suffix.dtype), suffix], dim=1)


def _without_context(hidden: Tensor, context: Tensor | None) -> Tensor:
    return hidden if context is None else hidden[:, context.shape[1] :]
