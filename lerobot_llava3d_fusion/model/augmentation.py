"""Training-time image augmentation that moves pixels and keeps the 3D geometry consistent.

A random crop of each camera image (a `scale` fraction of each side, anywhere inside the image) is
resized back to the full image. RGB (bilinear) and depth (nearest: no depth is invented between two
surfaces) are cropped with the same box in normalised image coordinates, whatever their resolutions,
and the intrinsics are rewritten for the cropped pixel grid, so every back-projected point keeps its
3D position and the RGB pixel above it. (LeRobot's dataset transforms, `--dataset.image_transforms`,
move RGB only: their `affine` must stay off with geometry.)

Pixel convention as in `geometry.py`: the centre of pixel u sits at u. A cropped image pixel u' shows
the source point u = scale * u' + offset_px, so fx' = fx / scale, cx' = (cx - offset_px) / scale.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from lerobot_llava3d_fusion.geometry.depth_noise import sensor_depth_noise
from lerobot_llava3d_fusion.model.network import ModelInputs


def random_crop_offsets(batch_size: int, scale: float, device: torch.device) -> Tensor:
    """(B, 2) crop centres (x, y) in normalised coordinates, uniform where the box stays inside."""
    return (torch.rand(batch_size, 2, device=device) * 2 - 1) * (1 - scale)


def crop_and_resize(images: Tensor, scale: float, offsets: Tensor, mode: str) -> Tensor:
    """(B, C, H, W) -> (B, C, H, W): the crop box of side `scale` centred at `offsets`, resized back."""
    theta = images.new_zeros(images.shape[0], 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = offsets.to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def crop_intrinsics(intrinsics: Tensor, scale: float, offsets: Tensor, height: int, width: int) -> Tensor:
    """(B, 3, 3) intrinsics of an H x W grid -> those of the same grid after `crop_and_resize`."""
    # Source pixel of cropped pixel u': u = scale * u' + shift, from align_corners=False sampling.
    shift_x = scale * 0.5 + (offsets[:, 0] + 1 - scale) * width / 2 - 0.5
    shift_y = scale * 0.5 + (offsets[:, 1] + 1 - scale) * height / 2 - 0.5
    cropped = intrinsics.clone()
    cropped[:, :2, :2] = intrinsics[:, :2, :2] / scale  # fx, skew, fy
    cropped[:, 0, 2] = (intrinsics[:, 0, 2] - shift_x) / scale
    cropped[:, 1, 2] = (intrinsics[:, 1, 2] - shift_y) / scale
    return cropped


def random_crop_inputs(inputs: ModelInputs, scale: float) -> ModelInputs:
    """One random crop per camera and sample, applied alike to the image, its depth and its intrinsics, so
    the 3D positions stay consistent with the pixels; every other geometry field (extrinsics, origin) kept."""
    images, camera_geometry = [], []
    for image, camera in zip(inputs.images, inputs.camera_geometry, strict=True):
        batch_size = image.shape[0]
        offsets = random_crop_offsets(batch_size, scale, image.device)
        images.append(crop_and_resize(image, scale, offsets, mode="bilinear"))
        if camera is not None:
            # The intrinsics describe the depth's grid, or the image's when depth is estimated.
            grid = image if camera.depth is None else camera.depth
            intrinsics = crop_intrinsics(camera.intrinsics.expand(batch_size, 3, 3), scale, offsets, *grid.shape[-2:])
            depth = None if camera.depth is None else crop_and_resize(camera.depth, scale, offsets, "nearest")
            camera = dataclasses.replace(camera, intrinsics=intrinsics, depth=depth)
        camera_geometry.append(camera)
    return inputs._replace(images=images, camera_geometry=camera_geometry)


def sensor_depth_noise_inputs(inputs: ModelInputs) -> ModelInputs:
    """Every recorded depth map made sensor-like (`geometry/depth_noise.py`), at its recorded resolution
    and before any crop, as a real camera would deliver it."""
    camera_geometry = [
        camera
        if camera is None or camera.depth is None
        else dataclasses.replace(camera, depth=sensor_depth_noise(camera.depth))
        for camera in inputs.camera_geometry
    ]
    return inputs._replace(camera_geometry=camera_geometry)
