"""The LeRobotDataset layout of LIBERO RGB-D recordings, shared by the recorder and the HDF5 converter.

Feature names and conventions are those of LeRobot's LIBERO datasets and env (images rotated as
LeRobot rotates them, 8-d state, 7-d action), plus each camera's geometry under the policy's keys
(:func:`..observation_keys.camera_geometry_features`). Frames are built from observations processed
exactly as ``lerobot-eval --env.type=libero_rgbd`` processes them, so a recording matches what a policy
sees at evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE

from lerobot_llava3d_fusion.envs.libero_rgbd import LiberoRGBDEnvConfig
from lerobot_llava3d_fusion.observation_keys import camera_geometry_features

STATE_NAMES = ["eef_x", "eef_y", "eef_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z",
               "gripper_qpos_left", "gripper_qpos_right"]  # fmt: skip
ACTION_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


def dataset_features(cfg: LiberoRGBDEnvConfig) -> dict[str, dict]:
    """LeRobotDataset features of a recording: public LIBERO dataset keys plus the geometry."""
    h, w = cfg.observation_height, cfg.observation_width
    features: dict[str, dict] = {
        OBS_STATE: {"dtype": "float32", "shape": (8,), "names": STATE_NAMES},
        ACTION: {"dtype": "float32", "shape": (7,), "names": ACTION_NAMES},
    }
    for camera in cfg.camera_names():
        features[f"{OBS_IMAGES}.{camera}"] = {
            "dtype": "image", "shape": (h, w, 3), "names": ["height", "width", "channel"]
        }  # fmt: skip
        features.update(camera_geometry_features(camera, h, w))
    return features


def frame_from_batch(batch: dict[str, Any], features: dict[str, dict], action: np.ndarray, task: str) -> dict:
    """One dataset frame from an observation batch of size 1 that went through the env processors."""
    frame: dict[str, Any] = {ACTION: action, "task": task}
    for key, feature in features.items():
        if key == ACTION:
            continue
        value = batch[key][0]
        if (feature.get("info") or {}).get("is_depth_map"):
            value = value.permute(1, 2, 0)  # (1, H, W) -> the depth map's (H, W, 1), metres
        elif feature["dtype"] == "image":
            # Back to the uint8 HWC the public datasets store; exact, the env rendered uint8.
            value = (value.permute(1, 2, 0) * 255).round().to(torch.uint8)
        frame[key] = value.numpy()
    return frame
