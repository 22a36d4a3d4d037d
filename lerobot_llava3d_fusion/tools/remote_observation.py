"""A robot observation received by the policy server -> the batch the policy's preprocessor takes.

LeRobot's ``robot_client`` sends ``robot.get_observation()`` as it is (joints, RGB ``uint8`` (H, W, 3),
a depth camera's ``<cam>_depth`` ``uint16`` (H, W, 1) millimetres) with the dataset features of the
robot. LeRobot's own helper (``raw_observation_to_observation``) builds the state, the RGB images
(bilinear resize to the policy's image size, float [0, 1]) and the task; it cannot take depth (it would
resize millimetres bilinearly, which raises on ``uint16`` and would blend foreground and background
depths at edges). The depth is done here:

    <cam>_depth (H, W[, 1]), uint16 millimetres or float metres
        -> nearest-neighbour resize to the policy's depth grid (values are never blended)
        -> (1, 1, h, w) under the policy's depth key of that camera, dtype kept: the preprocessor's
           ``DepthToMetresStep`` converts millimetres to metres, as in ``lerobot-rollout``
    observation.intrinsics.<cam> (3, 3), optional, for the received depth grid -> scaled to the resized
        grid; without it the policy uses its config's ``camera_intrinsics`` (given for its depth grid)
    observation.extrinsics.<cam> (4, 4), optional, passed through

At the policy's own depth size the result is exactly what ``lerobot-rollout`` hands the preprocessor.
A missing or malformed entry raises ``ValueError`` naming the key and what was expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lerobot.async_inference.helpers import raw_observation_to_observation
from lerobot.configs import FeatureType, PreTrainedConfig
from lerobot.utils.constants import OBS_STATE

from lerobot_llava3d_fusion.observation_keys import (
    CAMERA_MATRIX_PREFIXES,
    CAMERA_MATRIX_SHAPES,
    IMAGE_PREFIX,
    INTRINSICS_PREFIX,
    ROBOT_DEPTH_SUFFIX,
    depth_key,
)


def is_depth_feature(feature: dict) -> bool:
    """A robot's depth camera among LeRobot dataset features: a 1-channel image."""
    shape = tuple(feature.get("shape", ()))
    return feature.get("dtype") in ("image", "video") and len(shape) == 3 and shape[-1] == 1


def split_depth_features(lerobot_features: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(features without the depth cameras, the depth cameras' features)."""
    depth = {key: ft for key, ft in lerobot_features.items() if is_depth_feature(ft)}
    return {key: ft for key, ft in lerobot_features.items() if key not in depth}, depth


def _policy_depth_key(robot_key: str, policy_config: PreTrainedConfig) -> str | None:
    """The policy's key for the robot's ``observation.images.<cam>_depth``: that key itself, or
    ``observation.depth.<cam>``; None when the policy reads no depth of that camera."""
    inputs = policy_config.input_features or {}
    if robot_key in inputs:
        return robot_key
    ours = depth_key(robot_key.removesuffix(ROBOT_DEPTH_SUFFIX))
    return ours if ours in inputs else None


def _raw_entry(raw: dict[str, Any], feature_key: str) -> Any:
    name = feature_key.removeprefix(IMAGE_PREFIX)
    if name not in raw:
        raise ValueError(
            f"observation has no {name!r} (feature {feature_key!r}); the robot's observation must carry "
            f"every feature the client announced. Keys received: {sorted(raw)}"
        )
    return raw[name]


def _check_rgb(raw: dict[str, Any], key: str) -> None:
    image = np.asarray(_raw_entry(raw, key))
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{key}: expected an RGB image (H, W, 3), got shape {image.shape}")


def _depth_tensor(raw: dict[str, Any], key: str) -> torch.Tensor:
    """(H, W) or (H, W, 1) integer millimetres / float metres -> (1, 1, H, W), dtype kept."""
    depth = torch.as_tensor(np.asarray(_raw_entry(raw, key)))
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(
            f"{key}: expected a depth map (H, W) or (H, W, 1) (uint16 millimetres or float metres), "
            f"got shape {tuple(depth.shape)}"
        )
    if depth.dtype == torch.bool or depth.is_complex():
        raise ValueError(f"{key}: depth of dtype {depth.dtype} is neither millimetres (integers) nor metres")
    return depth[None, None]


def resize_depth_nearest(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, *size) by nearest neighbour (pixel centres), dtype and values kept."""
    if tuple(depth.shape[-2:]) == tuple(size):
        return depth
    # float64 holds every uint16 / int32 value exactly; nearest only picks values, never mixes them.
    return F.interpolate(depth.double(), size=size, mode="nearest-exact").to(depth.dtype)


def resize_intrinsics(
    intrinsics: torch.Tensor, source: tuple[int, int], target: tuple[int, int]
) -> torch.Tensor:
    """(..., 3, 3) pinhole K of a ``source`` (H, W) grid -> K of the same view resized to ``target``.

    Pixel centres map as u' = (u + 0.5) * s - 0.5 (the resize samples at pixel centres)."""
    scale_y, scale_x = target[0] / source[0], target[1] / source[1]
    resized = intrinsics.clone()
    resized[..., 0, :2] = intrinsics[..., 0, :2] * scale_x
    resized[..., 1, :2] = intrinsics[..., 1, :2] * scale_y
    resized[..., 0, 2] = (intrinsics[..., 0, 2] + 0.5) * scale_x - 0.5
    resized[..., 1, 2] = (intrinsics[..., 1, 2] + 0.5) * scale_y - 0.5
    return resized


def _camera_matrix(raw: dict[str, Any], key: str) -> torch.Tensor:
    matrix = torch.as_tensor(np.asarray(raw[key]), dtype=torch.float32)
    entry = key.removeprefix("observation.").split(".")[0]
    expected = CAMERA_MATRIX_SHAPES[entry]
    if tuple(matrix.shape) != expected:
        raise ValueError(f"{key}: expected shape {expected}, got {tuple(matrix.shape)}")
    return matrix[None]


def prepare_remote_observation(
    raw: dict[str, Any], lerobot_features: dict[str, dict], policy_config: PreTrainedConfig
) -> dict[str, Any]:
    """The preprocessor's input for one robot observation (batch of 1), depth and camera matrices included.

    Args:
        raw: ``robot.get_observation()`` plus ``task`` (and optional ``observation.intrinsics.<cam>`` /
            ``observation.extrinsics.<cam>``), as the client sent it.
        lerobot_features: the robot's dataset features, as the client announced them.
        policy_config: the served policy's config (its input features give the image and depth sizes).
    """
    rgb_features, depth_features = split_depth_features(lerobot_features)
    # Cameras of the robot the policy does not read are left out (as lerobot-rollout's policy ignores them).
    rgb_features = {
        key: feature
        for key, feature in rgb_features.items()
        if not key.startswith(IMAGE_PREFIX) or key in policy_config.image_features
    }
    for key, feature in rgb_features.items():
        if key.startswith(IMAGE_PREFIX):
            _check_rgb(raw, key)
        elif key == OBS_STATE:
            missing = [name for name in feature.get("names") or [] if name not in raw]
            if missing:
                raise ValueError(f"{OBS_STATE}: the observation has no {missing} (the robot's state entries)")
    observation = raw_observation_to_observation(raw, rgb_features, policy_config.image_features)

    resized_grids: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # camera -> (source, target)
    for robot_key in depth_features:
        target_key = _policy_depth_key(robot_key, policy_config)
        if target_key is None:
            continue
        depth = _depth_tensor(raw, robot_key)
        size = tuple(policy_config.input_features[target_key].shape[-2:])
        camera = robot_key.removeprefix(IMAGE_PREFIX).removesuffix(ROBOT_DEPTH_SUFFIX)
        resized_grids[camera] = (tuple(depth.shape[-2:]), size)
        observation[target_key] = resize_depth_nearest(depth, size)

    for key in raw:
        if isinstance(key, str) and key.startswith(CAMERA_MATRIX_PREFIXES):
            matrix = _camera_matrix(raw, key)
            camera = key.removeprefix(INTRINSICS_PREFIX)
            if key.startswith(INTRINSICS_PREFIX) and camera in resized_grids:
                matrix = resize_intrinsics(matrix, *resized_grids[camera])
            observation[key] = matrix
    return observation


def check_policy_inputs(
    observation: dict[str, Any], policy_config: PreTrainedConfig, rename_map: dict[str, str] | None = None
) -> None:
    """Raise naming every camera, depth map or state the policy reads and the observation lacks."""
    renamed = {(rename_map or {}).get(key, key) for key in observation}
    required = [
        key
        for key, feature in (policy_config.input_features or {}).items()
        if feature.type is FeatureType.VISUAL or key == OBS_STATE
    ]
    missing = [key for key in required if key not in renamed]
    if missing:
        raise ValueError(
            f"the policy reads {missing}, which the observation lacks (it has {sorted(renamed)}). A depth "
            "map comes from the robot camera's '<cam>_depth' (e.g. a RealSense with use_depth=True)."
        )
