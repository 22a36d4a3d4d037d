"""LLaVA-3D's own 3D patches: a learned position MLP added to the vision tower's features, and voxel pooling.

LLaVA-3D (its `SpatialAwareModule` and `RGBDVideoTower`) builds 3D patches like this: every depth pixel is
back-projected with the intrinsics and the camera-to-world pose; the xyz map is resized (nearest) to the
vision tower's patch grid; a learned MLP, ``Linear(3, C) -> LayerNorm(C) -> ReLU -> Linear(C, C)`` on the
vision width C, turns each patch's xyz into a vector that is ADDED to the tower's patch feature; the patches
of all views are averaged per voxel; and only then does the projector map them into the LLM.

Here the same steps run on the policy's inputs: :class:`Llava3DGeometryEncoder` gives each camera's patches
their points (:func:`~.geometry.backproject_depth` + :func:`~.geometry.points_to_patches`, world frame with
extrinsics, camera frame without, metres) and :class:`Llava3DPositionMLP` their position vectors;
:func:`voxel_pool` merges the patches of all cameras that share a voxel. Patches without valid depth get
no 3D term and are never merged (the original has no notion of missing depth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lerobot_llava3d_fusion.geometry.patch_points import DepthToPatchPoints, check_patch_points

__all__ = ["Llava3DGeometryEncoder", "Llava3DPositionMLP", "VoxelTokens", "voxel_pool"]


class Llava3DPositionMLP(nn.Module):
    """Per-patch xyz ``(B, N, 3)`` -> ``(B, N, C)`` vector to add to the tower's patch features.

    ``position_embedding_head`` is LLaVA-3D's ``PositionEmbeddingLearnedMLP`` head with the same indices,
    so an original checkpoint's ``positional_embedding.position_embedding_head.{0,1,3}.*`` tensors load
    into it unchanged. With ``gated`` (weights that do not come from a LLaVA-3D checkpoint) the output is
    multiplied channel-wise by a gate initialised at ``gate_init``, as the sinusoidal encoder; without it
    (pretrained LLaVA-3D weights) the term is added at the strength it was trained with.
    """

    def __init__(self, width: int, gated: bool, gate_init: float = 0.0):
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Linear(3, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width)
        )
        # LLaVA-3D initialises the matrices with Xavier-uniform (biases keep PyTorch's defaults).
        for parameter in self.position_embedding_head.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        self.gate = nn.Parameter(torch.full((width,), float(gate_init))) if gated else None

    def forward(self, patch_points: Tensor, patch_valid: Tensor) -> Tensor:
        """``(B, N, 3)`` metres, ``(B, N)`` validity -> ``(B, N, C)`` in the parameters' dtype, 0 where invalid."""
        check_patch_points(patch_points, patch_valid)
        first, rest = self.position_embedding_head[0], self.position_embedding_head[1:]
        dtype = first.weight.dtype
        # Metric xyz enter the first layer in float32 whatever the autocast or storage dtype: bf16 would
        # round points 0.5-1 m away to 4 mm steps before any weight could tell them apart.
        with torch.autocast(patch_points.device.type, enabled=False):
            hidden = F.linear(patch_points.float(), first.weight.float(), first.bias.float())  # (B, N, C)
        embedding = rest(hidden.to(dtype))
        if self.gate is not None:
            embedding = self.gate * embedding
        return embedding * patch_valid.unsqueeze(-1).to(dtype)


class Llava3DGeometryEncoder(DepthToPatchPoints):
    """Depth + camera -> per-patch points on the tower's feature grid, and their LLaVA-3D position vectors."""

    def __init__(
        self,
        width: int,
        grid_size: tuple[int, int],
        gated: bool,
        gate_init: float = 0.0,
        patch_point_method: str = "nearest",
        min_depth: float = 1e-3,
        max_depth: float = 100.0,
    ):
        super().__init__(grid_size, patch_point_method, min_depth, max_depth)
        self.position_mlp = Llava3DPositionMLP(width, gated, gate_init)


@dataclass
class VoxelTokens:
    """Patches averaged per voxel, padded to the sample with the most voxels."""

    features: Tensor  # (B, V, C) mean feature of each voxel; 0 in padding slots
    points: Tensor  # (B, V, 3) mean point of each voxel; 0 in padding slots and for depth-less patches
    valid: Tensor  # (B, V) bool: the token has a 3D point (False for depth-less patches and padding)
    mask: Tensor  # (B, V) bool: the token exists (False for padding)


def voxel_pool(features: Tensor, points: Tensor, valid: Tensor, voxel_size: float) -> VoxelTokens:
    """Average the patches of one sample that fall in the same voxel into one token.

    Voxels are ``round(xyz / voxel_size)`` cells (LLaVA-3D's voxelisation), taken per sample over all its
    patches (all cameras). Tokens come sample by sample in the order of their voxel coordinates (x, then y,
    then z), as the original's sorted voxel keys; patches without a valid point are kept as tokens of
    their own, after the voxels, in patch order. The number of tokens varies per sample: shorter samples
    are padded at the end and ``mask`` says which tokens exist.

    Args:
        features: ``(B, N, C)`` patch features (any float dtype; averaged in float32).
        points: ``(B, N, 3)`` patch points, metres.
        valid: ``(B, N)`` bool, False for patches without a point.
        voxel_size: edge of a voxel, metres (> 0).
    """
    if not voxel_size > 0.0:
        raise ValueError(f"voxel_size must be > 0 metres, got {voxel_size}")
    if features.ndim != 3 or points.shape != (*features.shape[:2], 3) or valid.shape != features.shape[:2]:
        raise ValueError(
            f"expected features (B, N, C), points (B, N, 3) and valid (B, N), got {tuple(features.shape)}, "
            f"{tuple(points.shape)} and {tuple(valid.shape)}"
        )
    batch, length, width = features.shape
    device = features.device
    cells = torch.round(points.float() / voxel_size).long()  # (B, N, 3)
    sample = torch.arange(batch, device=device)[:, None].expand(batch, length)
    patch = torch.arange(length, device=device)[None, :].expand(batch, length)
    # Key (sample, depth-less?, cell x, cell y, cell z); a depth-less patch gets its index as its own cell.
    keys = torch.stack(
        [
            sample,
            (~valid).long(),
            torch.where(valid, cells[..., 0], patch),
            torch.where(valid, cells[..., 1], 0),
            torch.where(valid, cells[..., 2], 0),
        ],
        dim=-1,
    ).flatten(0, 1)  # (B * N, 5)
    # Sorted unique rows: sample-major, voxels before depth-less patches, voxels by (x, y, z).
    unique_keys, group = torch.unique(keys, dim=0, return_inverse=True)  # (G, 5), (B * N,)
    num_groups = unique_keys.shape[0]
    counts = torch.zeros(num_groups, device=device).index_add_(
        0, group, torch.ones_like(group, dtype=torch.float)
    )
    mean_features = (
        torch.zeros(num_groups, width, device=device).index_add_(0, group, features.flatten(0, 1).float())
        / counts[:, None]
    )
    mean_points = (
        torch.zeros(num_groups, 3, device=device).index_add_(0, group, points.flatten(0, 1).float())
        / counts[:, None]
    )

    group_sample = unique_keys[:, 0]
    tokens_per_sample = torch.bincount(group_sample, minlength=batch)  # (B,)
    first_group = torch.cumsum(tokens_per_sample, 0) - tokens_per_sample  # (B,)
    slot = torch.arange(num_groups, device=device) - first_group[group_sample]  # (G,) position in its sample
    max_tokens = int(tokens_per_sample.max())  # the one host sync: the padded length
    index = (group_sample, slot)
    pooled = torch.zeros(batch, max_tokens, width, device=device).index_put(index, mean_features)
    pooled_points = torch.zeros(batch, max_tokens, 3, device=device).index_put(index, mean_points)
    pooled_valid = torch.zeros(batch, max_tokens, dtype=torch.bool, device=device).index_put(
        index, unique_keys[:, 1] == 0
    )
    mask = torch.zeros(batch, max_tokens, dtype=torch.bool, device=device).index_put(
        index, torch.ones_like(slot, dtype=torch.bool)
    )
    return VoxelTokens(pooled.to(features.dtype), pooled_points, pooled_valid, mask)
