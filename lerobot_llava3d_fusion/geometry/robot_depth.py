"""Depth from LeRobot robots' depth cameras, mapped to the policy's geometry inputs.

LeRobot's convention (0.6.1, ``lerobot/robots/*``, ``lerobot/cameras/realsense``): a camera ``<cam>``
configured with ``use_depth=True`` (e.g. ``RealSenseCameraConfig``) adds ``<cam>_depth`` to the
robot's observation next to ``<cam>``: ``uint16`` (H, W, 1), millimetres (the sensor's z16 values),
0 where nothing was measured, on the depth sensor's own pixel grid (LeRobot does not align it to the
colour image), with no intrinsics. ``lerobot-record`` stores it as the depth map
``observation.images.<cam>_depth`` (``info.is_depth_map``); ``LeRobotDataset`` returns it as float32
in ``--dataset.depth_output_unit`` (millimetres unless told otherwise); ``lerobot-rollout`` hands the
policy ``observation.images.<cam>_depth`` as the raw ``uint16`` (1, 1, H, W).

The mapping to this policy's inputs (:class:`DepthToMetresStep`, part of the policy's preprocessor):

    observation.images.<cam>_depth  ->  observation.depth.<cam>    float32 (B, 1, H, W), metres
        next to observation.images.<cam> (the RGB camera it belongs to)
    integer dtype (a robot's raw frames): millimetres, x 0.001
    floating dtype: metres (LeRobot's own rule, ``lerobot.configs.video.infer_depth_unit``); load
        datasets with ``--dataset.depth_output_unit=m``, or train with ``--policy.dataset_depth_unit=mm``
        (float millimetres are otherwise rejected by the policy)
    intrinsics: ``observation.intrinsics.<cam>`` when present, else the policy config's
        ``camera_intrinsics["<cam>"]`` (3 x 3, for the depth map's pixel grid); for a RealSense read
        them from the camera with :func:`~lerobot_llava3d_fusion.tools.realsense_intrinsics.realsense_intrinsics` (or ``python -m
        lerobot_llava3d_fusion.geometry.robot_depth --serial ...``, which prints the ``--policy.camera_intrinsics``
        flag)

So a policy trained with ``geometry=depth`` on such a dataset keeps the robot's key names and runs in
``lerobot-rollout`` on that robot without ``--rename_map``. A policy trained on ``observation.depth.<cam>``
(e.g. LIBERO RGB-D) runs on a robot with ``--rename_map='{"observation.images.<cam>_depth":
"observation.depth.<cam>"}'``: the renamed millimetres are converted here too.

Nothing is dropped silently: a depth map the policy cannot attach to one of its RGB cameras fails the
config's feature validation (:func:`check_depth_features`), and a batch that carries a camera's depth
only under the robot's key while the policy expects ``observation.depth.<cam>`` fails here, naming
the key and the ``--rename_map`` that fixes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.processor import ObservationProcessorStep, ProcessorStepRegistry

from lerobot_llava3d_fusion.observation_keys import (
    DEPTH_PREFIX,
    IMAGE_PREFIX,
    ROBOT_DEPTH_SUFFIX,
    depth_key,
    robot_depth_key,
)

logger = logging.getLogger(__name__)

MM_PER_METRE = 1000.0


def is_depth_map(key: str, feature: PolicyFeature) -> bool:
    """A depth map among the features: ``observation.depth.*``, or a 1-channel ``observation.images.*``.

    LeRobot types 1-channel cameras as depth maps (``hw_to_dataset_features``: shape (H, W, 1) ->
    ``is_depth_map``); policy features are channel-first, (1, H, W).
    """
    if key.startswith(DEPTH_PREFIX):
        return True
    shape = tuple(feature.shape)
    return (
        key.startswith(IMAGE_PREFIX)
        and feature.type is FeatureType.VISUAL
        and len(shape) == 3
        and shape[0] == 1
    )


def check_depth_features(features: dict[str, PolicyFeature]) -> dict[str, str]:
    """Attach every depth map of ``features`` to its RGB camera, or raise naming the key and the fix.

    Returns:
        ``{depth key: camera key}``, e.g. ``{"observation.images.front_depth": "observation.images.front",
        "observation.depth.image": "observation.images.image"}``.
    Raises:
        ValueError: a depth map with no RGB camera of that name, or two depth maps for one camera.
    """
    cameras = {
        key for key, ft in features.items() if key.startswith(IMAGE_PREFIX) and not is_depth_map(key, ft)
    }
    owners: dict[str, str] = {}
    for key, feature in features.items():
        if not is_depth_map(key, feature):
            continue
        if key.startswith(DEPTH_PREFIX):
            camera = IMAGE_PREFIX + key.removeprefix(DEPTH_PREFIX)
        else:
            camera = key.removesuffix(ROBOT_DEPTH_SUFFIX) if key.endswith(ROBOT_DEPTH_SUFFIX) else None
        if camera not in cameras:
            name = key.removeprefix(IMAGE_PREFIX).removeprefix(DEPTH_PREFIX).removesuffix(ROBOT_DEPTH_SUFFIX)
            raise ValueError(
                f"{key!r} is a depth map, but there is no RGB camera {IMAGE_PREFIX}{name!r} to attach it to "
                f"(RGB cameras: {sorted(cameras)}). llava3d_fusion reads a camera's depth as "
                f"'{DEPTH_PREFIX}<cam>' or as LeRobot's '{IMAGE_PREFIX}<cam>{ROBOT_DEPTH_SUFFIX}' next to "
                f"'{IMAGE_PREFIX}<cam>'. Fix: rename it to the camera it belongs to, e.g. "
                f'--rename_map=\'{{"{key}": "{DEPTH_PREFIX}<cam>"}}\', or record that camera\'s RGB too '
                "(use_rgb=True)."
            )
        if camera in owners.values():
            other = next(k for k, c in owners.items() if c == camera)
            raise ValueError(
                f"camera {camera!r} has two depth maps, {other!r} and {key!r}; keep one "
                "(drop the other from the dataset or rename it to another camera)."
            )
        owners[key] = camera
    return owners


def depth_in_metres(depth: torch.Tensor, key: str) -> torch.Tensor:
    """float32 metres from a depth tensor: integers are millimetres, floating point is metres."""
    if not isinstance(depth, torch.Tensor):
        depth = torch.as_tensor(depth)
    if depth.is_floating_point():
        return depth.float()
    if depth.dtype == torch.bool or depth.is_complex():
        raise TypeError(f"{key}: depth of dtype {depth.dtype} is neither millimetres (integers) nor metres")
    return depth.float() / MM_PER_METRE


@ProcessorStepRegistry.register(name="llava3d_fusion_depth_to_metres")
@dataclass
class DepthToMetresStep(ObservationProcessorStep):
    """Moves each camera's depth to ``observation.depth.<cam>`` as float32 metres.

    ``depth_keys`` maps the observation's depth key to the policy's: ``observation.images.<cam>_depth``
    (LeRobot robots and datasets) -> ``observation.depth.<cam>``, and ``observation.depth.<cam>`` to itself
    (integer depth under that key, e.g. renamed robot frames, is converted too). An absent key is left to
    the policy, which names it; a camera's depth under LeRobot's key while the policy expects ours is an
    error with the rename that fixes it.
    """

    depth_keys: dict[str, str] = field(default_factory=dict)

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        for source, target in self.depth_keys.items():
            if source in observation:
                observation[target] = depth_in_metres(observation.pop(source), source)
                continue
            robot_key = robot_depth_key(IMAGE_PREFIX + target.removeprefix(DEPTH_PREFIX))
            if source == target and robot_key in observation:
                raise KeyError(
                    f"the policy reads this camera's depth from {target!r}, but the observation has it as "
                    f"{robot_key!r} (a LeRobot depth camera). Map it with "
                    f'--rename_map=\'{{"{robot_key}": "{target}"}}\' (millimetres are converted to metres).'
                )
        return observation

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        observation = features.get(PipelineFeatureType.OBSERVATION)
        if not observation:
            return features
        renamed = {self.depth_keys.get(key, key): feature for key, feature in observation.items()}
        return {**features, PipelineFeatureType.OBSERVATION: renamed}

    def get_config(self) -> dict[str, Any]:
        return {"depth_keys": dict(self.depth_keys)}


def depth_sources(camera_keys: list[str], features: dict[str, PolicyFeature]) -> dict[str, str]:
    """``{observation depth key: observation.depth.<cam>}`` for the cameras with a depth feature."""
    sources = {}
    for camera_key in camera_keys:
        ours, robots = depth_key(camera_key), robot_depth_key(camera_key)
        if robots in features:
            sources[robots] = ours
        elif ours in features:
            sources[ours] = ours
    return sources
