"""3D position features for vision patch tokens (the LLaVA-3D idea).

A metric depth image and pinhole intrinsics (optionally camera-to-world extrinsics) are back-projected to one
3D point per pixel (world frame with extrinsics, camera frame without, metres). Each vision patch takes one
point from that map, either the mean of its valid pixels (``"mean"``) or the pixel a nearest-neighbour resize
of the map to the patch grid picks (``"nearest"``, what LLaVA-3D does), see :func:`points_to_patches`.

:class:`DepthToPatchPoints` does both steps for one camera. This module's point encoder turns a per-patch
point into a ``hidden_size`` vector (sinusoidal 3D encoding followed by an MLP) that is meant to be ADDED to the
projected patch token. It is scaled by a learnable gate initialised at zero, so a pretrained vision-language
model starts out unchanged and only learns to use the 3D points as the gate opens. LLaVA-3D's own encoder (a
learned MLP on xyz, added before the projector) is in ``llava3d_geometry.py``.

Conventions (OpenCV):
    * camera frame: x right, y down, z forward; depth is the metric z coordinate (not the ray length);
    * pixel ``(u, v)`` = (column index, row index), and the centre of pixel ``(u, v)`` sits exactly at
      ``(u, v)``, i.e. ``x = (u - cx) * z / fx`` and ``y = (v - cy) * z / fy``. Intrinsics that put pixel
      centres at ``u + 0.5`` (some renderers) must have ``cx`` and ``cy`` shifted by ``-0.5`` by the caller;
    * the intrinsics must describe the pixel grid of the depth image actually passed in: if the depth was
      resized or cropped, scale/shift ``fx, fy, cx, cy`` accordingly before calling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PATCH_POINT_METHODS",
    "DepthToPatchPoints",
    "SinusoidalGeometryEncoder",
    "SinusoidalPositionMLP",
    "backproject_depth",
    "flip_intrinsics",
    "check_patch_points",
    "nearest_points_to_patches",
    "points_to_patch_samples",
    "points_to_patches",
    "pool_points_to_patches",
    "sinusoidal_3d_encoding",
]

# Smallest wavelength of the sinusoidal encoding, in metres. One centimetre is about the precision that
# matters for manipulation; finer wavelengths would mostly encode depth-sensor noise.
DEFAULT_MIN_WAVELENGTH = 0.01

# How a patch takes its 3D point from the per-pixel map: "mean" of its valid pixels, or "nearest"
# (nearest-neighbour resize of the map to the patch grid, as LLaVA-3D).
PATCH_POINT_METHODS = ("mean", "nearest")


def _batched_matrix(matrix: Tensor, size: int, batch_size: int, name: str) -> Tensor:
    """Check that ``matrix`` is ``(size, size)`` or ``(batch_size, size, size)``; return the batched form."""
    if matrix.ndim not in (2, 3) or matrix.shape[-2:] != (size, size):
        raise ValueError(
            f"{name} must have shape ({size}, {size}) or (B, {size}, {size}), got {tuple(matrix.shape)}"
        )
    if matrix.ndim == 2:
        return matrix.unsqueeze(0).expand(batch_size, size, size)
    if matrix.shape[0] != batch_size:
        raise ValueError(f"{name} has batch size {matrix.shape[0]} but depth has batch size {batch_size}")
    return matrix


def _check_grid_size(grid_size: tuple[int, int]) -> tuple[int, int]:
    """Check that ``grid_size`` is two positive ints and return it as a tuple."""
    if (
        not isinstance(grid_size, (tuple, list))
        or len(grid_size) != 2
        or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in grid_size)
    ):
        raise ValueError(f"grid_size must be two positive ints (gh, gw), got {grid_size!r}")
    return int(grid_size[0]), int(grid_size[1])


def _check_samples_per_side(samples_per_side: int) -> int:
    """Check that ``samples_per_side`` is a positive int and return it."""
    if isinstance(samples_per_side, bool) or not isinstance(samples_per_side, int) or samples_per_side < 1:
        raise ValueError(f"samples_per_side must be a positive int, got {samples_per_side!r}")
    return samples_per_side


def backproject_depth(
    depth: Tensor,
    intrinsics: Tensor,
    extrinsics: Tensor | None = None,
    min_depth: float = 1e-3,
    max_depth: float = 100.0,
) -> tuple[Tensor, Tensor]:
    """Back-project a metric depth image to one 3D point per pixel.

    Args:
        depth: ``(B, 1, H, W)`` or ``(B, H, W)``, metres along the camera z axis.
        intrinsics: ``(B, 3, 3)`` or ``(3, 3)`` pinhole matrix ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` for
            this depth image's pixel grid (see the module docstring for the pixel convention). Skew ``s`` is
            honoured.
        extrinsics: optional ``(B, 4, 4)`` or ``(4, 4)`` camera-to-world homogeneous transform; when given,
            points are returned in the world (e.g. robot base) frame instead of the camera frame.
        min_depth: depths ``<= min_depth`` are invalid (holes are usually reported as 0).
        max_depth: depths ``> max_depth`` are invalid (sensor far-plane / sky values).

    Returns:
        points: ``(B, H, W, 3)`` float (float32, or float64 for float64 depth); invalid pixels are exactly 0.
        valid: ``(B, H, W)`` bool, False where depth is non-finite, ``<= min_depth`` or ``> max_depth``.
    """
    if depth.ndim == 4:
        if depth.shape[1] != 1:
            raise ValueError(f"depth must have shape (B, 1, H, W) or (B, H, W), got {tuple(depth.shape)}")
        depth = depth[:, 0]
    elif depth.ndim != 3:
        raise ValueError(f"depth must have shape (B, 1, H, W) or (B, H, W), got {tuple(depth.shape)}")
    if not 0.0 <= min_depth < max_depth:
        raise ValueError(f"need 0 <= min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}")

    batch_size, height, width = depth.shape
    # Half-precision depth loses centimetres at a few metres, so compute the points in at least float32.
    dtype = torch.promote_types(depth.dtype, torch.float32)
    depth = depth.to(dtype)
    intrinsics = _batched_matrix(intrinsics, 3, batch_size, "intrinsics").to(device=depth.device, dtype=dtype)

    valid = torch.isfinite(depth) & (depth > min_depth) & (depth <= max_depth)
    # Replace invalid depths before any arithmetic so NaN/inf never enter the graph, backward pass included.
    z = torch.where(valid, depth, torch.zeros_like(depth))

    fx = intrinsics[:, 0, 0].view(batch_size, 1, 1)
    skew = intrinsics[:, 0, 1].view(batch_size, 1, 1)
    cx = intrinsics[:, 0, 2].view(batch_size, 1, 1)
    fy = intrinsics[:, 1, 1].view(batch_size, 1, 1)
    cy = intrinsics[:, 1, 2].view(batch_size, 1, 1)
    v = torch.arange(height, device=depth.device, dtype=dtype).view(1, height, 1)
    u = torch.arange(width, device=depth.device, dtype=dtype).view(1, 1, width)

    # Inverse of u = fx * x/z + s * y/z + cx, v = fy * y/z + cy.
    y_over_z = (v - cy) / fy
    x_over_z = (u - cx - skew * y_over_z) / fx
    points = torch.stack((x_over_z * z, y_over_z * z, z), dim=-1)

    if extrinsics is not None:
        extrinsics = _batched_matrix(extrinsics, 4, batch_size, "extrinsics").to(
            device=depth.device, dtype=dtype
        )
        rotation = extrinsics[:, :3, :3]
        translation = extrinsics[:, :3, 3]
        # Under bf16 autocast the rotation would run in bf16: millimetres lost at a metre.
        with torch.autocast(depth.device.type, enabled=False):
            rotated = torch.einsum("bij,bhwj->bhwi", rotation, points)
        points = rotated + translation.view(batch_size, 1, 1, 3)
        # The translation moved the zeroed invalid points; put them back at 0 so they carry no information.
        points = points * valid.unsqueeze(-1).to(dtype)

    return points, valid


def flip_intrinsics(intrinsics: Tensor, height: int, width: int, flip_rows: bool, flip_cols: bool) -> Tensor:
    """Intrinsics of an image whose rows and/or columns were reversed.

    Reversing columns maps ``u -> W - 1 - u``, i.e. ``K' = F @ K`` with ``F = [[-1, 0, W-1], [0, 1, 0],
    [0, 0, 1]]`` (so ``fx`` and skew change sign, ``cx -> W - 1 - cx``); rows likewise with ``H``.
    The camera frame (and so the extrinsics) does not change.

    Args:
        intrinsics: (..., 3, 3) pixel-centre-at-integer ``K``.
        height, width: image size in pixels.
    Returns:
        (..., 3, 3) tensor, same dtype.
    """
    flip = torch.eye(3, dtype=intrinsics.dtype, device=intrinsics.device)
    if flip_cols:
        flip[0, 0], flip[0, 2] = -1.0, width - 1.0
    if flip_rows:
        flip[1, 1], flip[1, 2] = -1.0, height - 1.0
    return flip @ intrinsics


def pool_points_to_patches(
    points: Tensor, valid: Tensor, grid_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Average the valid 3D points inside each cell of a ``(gh, gw)`` patch grid laid over the image.

    Uses adaptive average pooling, so ``H`` and ``W`` need not be divisible by the grid; when they are not,
    adjacent cells overlap by up to one pixel (PyTorch's adaptive-pooling windows), which is harmless for a
    position feature.

    Args:
        points: ``(B, H, W, 3)`` points, e.g. from :func:`backproject_depth`.
        valid: ``(B, H, W)`` bool mask of the points to average.
        grid_size: ``(gh, gw)`` patch grid, e.g. the vision tower's patch grid.

    Returns:
        patch_points: ``(B, gh * gw, 3)`` mean of the valid points of each patch, in row-major patch order
            (the order of ViT patch tokens); 0 for patches without any valid pixel.
        patch_valid: ``(B, gh * gw)`` bool, True where the patch has at least one valid pixel.
    """
    grid_h, grid_w = _check_grid_size(grid_size)
    if points.ndim != 4 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, H, W, 3), got {tuple(points.shape)}")
    if valid.shape != points.shape[:-1]:
        raise ValueError(
            f"valid must have shape {tuple(points.shape[:-1])} (B, H, W), got {tuple(valid.shape)}"
        )

    mask = valid.to(points.dtype).unsqueeze(1)  # (B, 1, H, W)
    # Zero the invalid points explicitly (they may hold anything) so they add nothing to the sums.
    masked_points = torch.where(valid.unsqueeze(-1), points, torch.zeros_like(points)).permute(0, 3, 1, 2)

    # mean(points * valid) / mean(valid) over one window == sum of valid points / number of valid points.
    point_sums = F.adaptive_avg_pool2d(masked_points, (grid_h, grid_w))  # (B, 3, gh, gw)
    valid_fraction = F.adaptive_avg_pool2d(mask, (grid_h, grid_w))  # (B, 1, gh, gw)
    patch_valid = valid_fraction > 0
    # clamp_min only guards the empty patches, whose result is replaced by 0 anyway.
    patch_points = point_sums / valid_fraction.clamp_min(torch.finfo(points.dtype).tiny)
    patch_points = torch.where(patch_valid, patch_points, torch.zeros_like(patch_points))

    batch_size = points.shape[0]
    patch_points = patch_points.flatten(2).transpose(1, 2)  # (B, gh*gw, 3), row-major like ViT patches
    return patch_points, patch_valid.view(batch_size, grid_h * grid_w)


def nearest_points_to_patches(
    points: Tensor, valid: Tensor, grid_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """One pixel's point per patch: a nearest-neighbour resize of the ``(H, W)`` map to the ``(gh, gw)`` grid.

    This is how LLaVA-3D gives its patches a position (``F.interpolate(mode="nearest")`` of the xyz map to
    the feature grid): patch ``(i, j)`` takes pixel ``(floor(i * H / gh), floor(j * W / gw))``, the top-left
    pixel of its cell when the sizes divide.

    Args / returns: as :func:`pool_points_to_patches`; a patch is valid when its chosen pixel is.
    """
    grid_h, grid_w = _check_grid_size(grid_size)
    if points.ndim != 4 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, H, W, 3), got {tuple(points.shape)}")
    if valid.shape != points.shape[:-1]:
        raise ValueError(
            f"valid must have shape {tuple(points.shape[:-1])} (B, H, W), got {tuple(valid.shape)}"
        )
    batch_size = points.shape[0]
    patch_points = F.interpolate(points.permute(0, 3, 1, 2), size=(grid_h, grid_w), mode="nearest")
    patch_valid = F.interpolate(valid[:, None].to(points.dtype), size=(grid_h, grid_w), mode="nearest") > 0
    patch_points = patch_points.flatten(2).transpose(1, 2)  # (B, gh*gw, 3), row-major like ViT patches
    patch_valid = patch_valid.view(batch_size, grid_h * grid_w)
    return torch.where(patch_valid[..., None], patch_points, torch.zeros_like(patch_points)), patch_valid


def points_to_patches(
    points: Tensor, valid: Tensor, grid_size: tuple[int, int], method: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Per-patch points ``(B, gh * gw, 3)`` and validity ``(B, gh * gw)`` by ``method`` (PATCH_POINT_METHODS)."""
    if method == "mean":
        return pool_points_to_patches(points, valid, grid_size)
    if method == "nearest":
        return nearest_points_to_patches(points, valid, grid_size)
    raise ValueError(f"patch point method must be one of {PATCH_POINT_METHODS}, got {method!r}")


def points_to_patch_samples(
    points: Tensor, valid: Tensor, grid_size: tuple[int, int], method: str, samples_per_side: int
) -> tuple[Tensor, Tensor]:
    """Several points per patch: ``method`` on a ``samples_per_side`` times finer grid, grouped by patch.

    Each patch of the ``(gh, gw)`` grid is split into ``s x s`` cells (``s = samples_per_side``) and each
    cell takes its point as :func:`points_to_patches` would on the ``(gh * s, gw * s)`` grid, so an edge
    inside a patch (a 5 cm block seen through a 5 cm patch) is located to ``1 / s`` of a patch.

    Returns:
        samples: ``(B, gh * gw, s * s, 3)``, patches in row-major order, each patch's cells row-major.
        samples_valid: ``(B, gh * gw, s * s)`` bool.
    """
    grid_h, grid_w = _check_grid_size(grid_size)
    s = _check_samples_per_side(samples_per_side)
    fine_points, fine_valid = points_to_patches(points, valid, (grid_h * s, grid_w * s), method)
    batch_size = points.shape[0]

    def group_by_patch(fine: Tensor) -> Tensor:  # (B, gh*s * gw*s, ...) -> (B, gh*gw, s*s, ...)
        trailing = fine.shape[2:]
        cells = fine.reshape(batch_size, grid_h, s, grid_w, s, *trailing).transpose(2, 3)
        return cells.reshape(batch_size, grid_h * grid_w, s * s, *trailing)

    return group_by_patch(fine_points), group_by_patch(fine_valid)


def sinusoidal_3d_encoding(
    points: Tensor,
    num_frequencies: int,
    max_wavelength: float,
    min_wavelength: float = DEFAULT_MIN_WAVELENGTH,
) -> Tensor:
    """Encode 3D points with sines and cosines at geometrically spaced wavelengths.

    The wavelengths are ``geomspace(min_wavelength, max_wavelength, num_frequencies)`` (log-uniform spacing, a
    constant ratio between consecutive wavelengths; a single frequency uses ``max_wavelength``). The longest
    wavelength keeps the encoding unambiguous across a workspace of that size, the shortest resolves
    centimetre details.

    Args:
        points: ``(..., 3)`` metres.
        num_frequencies: number of wavelengths per coordinate.
        max_wavelength: longest wavelength, metres.
        min_wavelength: shortest wavelength, metres (``0 < min_wavelength <= max_wavelength``).

    Returns:
        ``(..., 6 * num_frequencies)`` float32 in ``[-1, 1]``, laid out per coordinate (x, y, z) as
        ``[sin(2 pi p / wavelength_k) for k] + [cos(2 pi p / wavelength_k) for k]``.
    """
    if points.shape[-1:] != (3,):
        raise ValueError(f"points must have shape (..., 3), got {tuple(points.shape)}")
    if num_frequencies < 1:
        raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
    if not 0.0 < min_wavelength <= max_wavelength:
        raise ValueError(
            f"need 0 < min_wavelength <= max_wavelength, got min_wavelength={min_wavelength}, "
            f"max_wavelength={max_wavelength}"
        )

    # float32 even under bf16 autocast/weights: bf16 angles at 2*pi*p/1cm would be off by whole periods.
    points = points.float()
    if num_frequencies == 1:
        wavelengths = torch.tensor([max_wavelength], device=points.device)
    else:
        wavelengths = torch.logspace(
            math.log10(min_wavelength), math.log10(max_wavelength), num_frequencies, device=points.device
        )
    angles = points.unsqueeze(-1) * (2.0 * math.pi / wavelengths)  # (..., 3, F)
    encoding = torch.cat((angles.sin(), angles.cos()), dim=-1)  # (..., 3, 2F)
    return encoding.flatten(-2)


def check_patch_points(patch_points: Tensor, patch_valid: Tensor, samples_per_patch: int = 1) -> None:
    """Per-patch points must be ``(B, N, 3)`` with a ``(B, N)`` validity mask, or with several samples per
    patch (``samples_per_patch > 1``) ``(B, N, samples_per_patch, 3)`` with a ``(B, N, samples_per_patch)``
    mask."""
    if samples_per_patch == 1:
        if patch_points.ndim != 3 or patch_points.shape[-1] != 3:
            raise ValueError(f"patch_points must have shape (B, N, 3), got {tuple(patch_points.shape)}")
    elif patch_points.ndim != 4 or patch_points.shape[-2:] != (samples_per_patch, 3):
        raise ValueError(
            f"patch_points must have shape (B, N, {samples_per_patch}, 3) ({samples_per_patch} samples per "
            f"patch), got {tuple(patch_points.shape)}"
        )
    if patch_valid.shape != patch_points.shape[:-1]:
        raise ValueError(
            f"patch_valid must have shape {tuple(patch_points.shape[:-1])}, got {tuple(patch_valid.shape)}"
        )


class DepthToPatchPoints(nn.Module):
    """One camera's depth image + camera matrices -> one 3D point per patch of a ``(gh, gw)`` grid.

    The base of the patch encoders: they add an ``encoder`` that turns these points into vectors.
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        patch_point_method: str = "mean",
        min_depth: float = 1e-3,
        max_depth: float = 100.0,
        samples_per_side: int = 1,
    ):
        super().__init__()
        _check_samples_per_side(samples_per_side)
        if patch_point_method not in PATCH_POINT_METHODS:
            raise ValueError(
                f"patch_point_method must be one of {PATCH_POINT_METHODS}, got {patch_point_method!r}"
            )
        if not 0.0 <= min_depth < max_depth:
            raise ValueError(
                f"need 0 <= min_depth < max_depth, got min_depth={min_depth}, max_depth={max_depth}"
            )
        self.grid_size = _check_grid_size(grid_size)
        self.patch_point_method = patch_point_method
        self.samples_per_side = samples_per_side
        self.min_depth = min_depth
        self.max_depth = max_depth

    def patch_points_of(
        self, depth: Tensor, intrinsics: Tensor, extrinsics: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-patch points ``(B, gh * gw, 3)`` and validity ``(B, gh * gw)`` of one camera; with
        ``samples_per_side`` s > 1, ``(B, gh * gw, s * s, 3)`` and ``(B, gh * gw, s * s)``
        (:func:`points_to_patch_samples`).

        See :func:`backproject_depth` for the input shapes and frames.
        """
        points, valid = backproject_depth(depth, intrinsics, extrinsics, self.min_depth, self.max_depth)
        if self.samples_per_side == 1:
            return points_to_patches(points, valid, self.grid_size, self.patch_point_method)
        return points_to_patch_samples(
            points, valid, self.grid_size, self.patch_point_method, self.samples_per_side
        )

    def forward(self, depth: Tensor, intrinsics: Tensor, extrinsics: Tensor | None = None) -> Tensor:
        """``(B, gh * gw, width)`` encoder vectors of one camera's patches."""
        return self.position_mlp(*self.patch_points_of(depth, intrinsics, extrinsics))


class SinusoidalPositionMLP(nn.Module):
    """Per-patch 3D point -> gated ``hidden_size`` vector to add to the patch token.

    ``sinusoidal_3d_encoding -> Linear -> SiLU -> Linear(hidden_size)``, multiplied channel-wise by
    ``gate`` and zeroed on patches without valid depth. The gate has one entry per channel: each
    entry gets its own gradient from the start, whereas a single scalar only gets the projection of
    the gradient on the random initial features, which stays near zero and kept the 3D points switched
    off in training. ``gate_init`` 0 (the default) makes the output exactly zero until training
    opens the gate, so a pretrained VLM starts unchanged; a model trained from scratch has nothing
    to preserve and learns faster with the gate open (1).

    With ``samples_per_patch`` P > 1 each patch brings P points (:func:`points_to_patch_samples`): their
    encodings, zero for invalid samples, are concatenated before the MLP, so the first layer sees where
    inside the patch each point lies; a patch is valid when any of its samples is.
    """

    def __init__(
        self,
        hidden_size: int,
        num_frequencies: int = 16,
        max_wavelength: float = 8.0,
        min_wavelength: float = DEFAULT_MIN_WAVELENGTH,
        gate_init: float = 0.0,
        samples_per_patch: int = 1,
    ):
        super().__init__()
        if samples_per_patch < 1:
            raise ValueError(f"samples_per_patch must be >= 1, got {samples_per_patch}")
        if not math.isfinite(gate_init):
            raise ValueError(f"gate_init must be finite, got {gate_init}")
        if not 0.0 < min_wavelength <= max_wavelength:
            raise ValueError(
                f"need 0 < min_wavelength <= max_wavelength, got min_wavelength={min_wavelength}, "
                f"max_wavelength={max_wavelength}"
            )
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
        self.num_frequencies = num_frequencies
        self.max_wavelength = max_wavelength
        self.min_wavelength = min_wavelength
        self.samples_per_patch = samples_per_patch
        self.mlp = nn.Sequential(
            nn.Linear(samples_per_patch * 6 * num_frequencies, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.gate = nn.Parameter(torch.full((hidden_size,), float(gate_init)))

    def forward(self, patch_points: Tensor, patch_valid: Tensor) -> Tensor:
        """``(B, N, 3)`` points, ``(B, N)`` validity (or ``(B, N, P, 3)``, ``(B, N, P)`` with P samples per
        patch) -> ``(B, N, hidden_size)`` in the parameters' dtype."""
        check_patch_points(patch_points, patch_valid, self.samples_per_patch)
        dtype = self.mlp[0].weight.dtype
        encoding = sinusoidal_3d_encoding(
            patch_points, self.num_frequencies, self.max_wavelength, self.min_wavelength
        )
        if self.samples_per_patch > 1:  # (B, N, P, 6F) -> (B, N, P * 6F), invalid samples zeroed
            encoding = (encoding * patch_valid.unsqueeze(-1)).flatten(-2)
            patch_valid = patch_valid.any(-1)
        features = self.mlp(encoding.to(dtype))
        return self.gate * features * patch_valid.unsqueeze(-1).to(dtype)


class SinusoidalGeometryEncoder(DepthToPatchPoints):
    """Depth image + camera -> ``(B, gh * gw, hidden_size)`` gated sinusoidal vectors to add to the patch
    tokens (after the projector)."""

    def __init__(
        self,
        hidden_size: int,
        grid_size: tuple[int, int],
        num_frequencies: int = 16,
        max_wavelength: float = 8.0,
        min_depth: float = 1e-3,
        max_depth: float = 100.0,
        min_wavelength: float = DEFAULT_MIN_WAVELENGTH,
        gate_init: float = 0.0,
        patch_point_method: str = "mean",
        samples_per_side: int = 1,
    ):
        super().__init__(grid_size, patch_point_method, min_depth, max_depth, samples_per_side)
        self.position_mlp = SinusoidalPositionMLP(
            hidden_size, num_frequencies, max_wavelength, min_wavelength, gate_init, samples_per_side**2
        )
