"""``libero_rgbd``: LeRobot's LIBERO env plus per-camera metric depth and camera geometry.

Use it like LeRobot's ``libero`` env type::

    lerobot-eval --env.type=libero_rgbd --env.task=libero_spatial ...

What the policy's preprocessor receives (after ``preprocess_observation`` and this config's env
processors), for each camera ``cam`` in ``image`` (agent view) and ``image2`` (wrist):

- ``observation.images.<cam>``: float32 (B, 3, H, W) in [0, 1], exactly as LeRobot's ``libero``
  delivers it (rotated 180 degrees from robosuite's buffer by ``LiberoProcessorStep``).
- ``observation.depth.<cam>``: float32 (B, 1, H, W), metres along the camera's optical axis
  (z-depth, not ray length), 0 where invalid; pixel (row, col) is RGB pixel (row, col).
- ``observation.intrinsics.<cam>``: float32 (B, 3, 3), ``K`` of the delivered pixel grid:
  ``x = (u - cx) * z / fx``, ``y = (v - cy) * z / fy`` with ``u`` the column and ``v`` the row index
  (integer coordinates at pixel centres). NOTE: the LIBERO images LeRobot (and the public LIBERO
  datasets) use are horizontally mirrored views (robosuite's upside-down OpenGL buffer rotated by 180
  degrees), so ``fx`` is negative. Use ``K`` as given (``torch.linalg.inv(K)``) and it is exact;
  ``abs(fx)`` is the focal length in pixels.
- ``observation.extrinsics.<cam>``: float32 (B, 4, 4), camera-to-world pose of the physical camera in
  OpenCV axes (x right, y down, z forward), a proper rigid transform. World = the MuJoCo world frame,
  the frame of ``observation.state[:, :3]`` (end-effector position): z up, table top at z ~ 0.90 m,
  robot base at (-0.66, 0, 0.912) in LIBERO's table scenes. The wrist camera's pose changes each step.
- ``observation.state``: float32 (B, 8) as LeRobot's LIBERO builds it.

``lerobot_llava3d_fusion.geometry.patch_points.backproject_depth(depth, K, extrinsics)`` turns these into world points.

Route through LeRobot: the gym env (:mod:`.libero_rgbd_sim`) adds top-level arrays
``depth_<cam>`` / ``intrinsics_<cam>`` / ``extrinsics_<cam>`` to its observation;
``preprocess_observation`` passes unknown top-level arrays through as ``observation.<key>`` float
tensors; :class:`LiberoRGBDProcessorStep` (registered as ``libero_rgbd_processor`` and returned by
``get_env_processors`` after LeRobot's ``LiberoProcessorStep``) rotates depth like the images, adapts
``K`` to the rotation and moves everything to the keys above (names in :mod:`..observation_keys`).

Importing this module needs neither LIBERO nor its config: LIBERO is set up and imported when envs
are created. ``python -m lerobot_llava3d_fusion.tools.record_libero_rgbd`` records small datasets from
the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.envs.configs import LiberoEnv
from lerobot.envs.utils import parse_camera_names
from lerobot.processor import LiberoProcessorStep, PolicyProcessorPipeline
from lerobot.processor.pipeline import ObservationProcessorStep

from lerobot_llava3d_fusion.envs.camera_perturbation import check_camera_perturbation
from lerobot_llava3d_fusion.envs.instruction_perturbation import check_perturbation
from lerobot_llava3d_fusion.envs.libero_rgbd_sim import (
    MAX_CAMERA_TRANSLATION_PERTURBATION,
    create_libero_rgbd_envs,
)
from lerobot_llava3d_fusion.envs.registration import env_type, processor_step
from lerobot_llava3d_fusion.geometry.depth_noise import check_depth_noise
from lerobot_llava3d_fusion.geometry.patch_points import flip_intrinsics
from lerobot_llava3d_fusion.observation_keys import (
    CAMERA_MATRIX_SHAPES,
    DEPTH,
    EXTRINSICS,
    INTRINSICS,
    env_geometry_entry,
    env_geometry_key,
    geometry_key,
    parse_env_geometry_key,
)

# LeRobot's LiberoEnv maps robosuite camera obs keys to these names when no mapping is given.
_DEFAULT_CAMERA_NAME_MAPPING = {"agentview_image": "image", "robot0_eye_in_hand_image": "image2"}


@dataclass
@processor_step("libero_rgbd_processor")
class LiberoRGBDProcessorStep(ObservationProcessorStep):
    """Move the raw per-camera geometry to ``observation.{depth,intrinsics,extrinsics}.<cam>``.

    Runs after ``LiberoProcessorStep``, which rotates every ``observation.images.*`` by 180 degrees;
    the depth gets the same rotation and ``K`` the matching change of pixel coordinates.

    Input (per camera): ``observation.depth_<cam>`` (B, H, W, 1), ``observation.intrinsics_<cam>``
    (B, 3, 3) for the raw grid, ``observation.extrinsics_<cam>`` (B, 4, 4).
    Output: ``observation.depth.<cam>`` (B, 1, H, W), ``observation.intrinsics.<cam>`` (B, 3, 3),
    ``observation.extrinsics.<cam>`` (B, 4, 4), all float32.
    """

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        for key in list(observation):
            entry, camera = parse_env_geometry_key(key) or (None, None)
            if entry != DEPTH or camera is None:
                continue
            depth = observation.pop(key)
            intrinsics = observation.pop(env_geometry_key(INTRINSICS, camera))
            extrinsics = observation.pop(env_geometry_key(EXTRINSICS, camera))
            if depth.ndim != 4:
                raise ValueError(
                    f"{key}: expected a batched (B, H, W, 1) depth map, got {tuple(depth.shape)}"
                )
            # Same rotation as LiberoProcessorStep applies to the images (flip H and W).
            depth = torch.flip(depth.permute(0, 3, 1, 2), dims=[2, 3]).float().contiguous()
            height, width = depth.shape[-2:]
            observation[geometry_key(DEPTH, camera)] = depth
            observation[geometry_key(INTRINSICS, camera)] = flip_intrinsics(
                intrinsics.float(), height, width, flip_rows=True, flip_cols=True
            )
            observation[geometry_key(EXTRINSICS, camera)] = extrinsics.float()
        return observation

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        observation = features.get(PipelineFeatureType.OBSERVATION)
        if not observation:
            return features
        renamed = {}
        for key, feature in observation.items():
            entry, camera = parse_env_geometry_key(key) or (None, None)
            if camera is None:
                renamed[key] = feature
                continue
            shape = feature.shape
            if entry == DEPTH and len(shape) == 3 and shape[-1] == 1:
                shape = (1, shape[0], shape[1])  # (H, W, 1) -> (1, H, W)
            renamed[geometry_key(entry, camera)] = PolicyFeature(feature.type, shape)
        return {**features, PipelineFeatureType.OBSERVATION: renamed}


@env_type("libero_rgbd")
@dataclass
class LiberoRGBDEnvConfig(LiberoEnv):
    """LeRobot's ``libero`` env config (same options) whose envs also deliver depth and cameras.

    `instruction_perturbation` (``none``, ``other_task``: another task of the suite, ``shuffled``,
    ``empty``) replaces the instruction the policy receives; success stays the task's own.

    Robustness: `camera_translation_perturbation` (m, largest shift along each axis) and
    `camera_rotation_perturbation` (degrees, largest turn about each camera axis) move the fixed
    cameras in the simulator at each reset, drawn from the reset seed; `depth_noise` (``none`` or
    ``sensor``: a RealSense D400's noise, holes and millimetre steps). See
    :class:`.libero_rgbd_sim.CameraGeometryMixin`.
    """

    instruction_perturbation: str = "none"
    camera_translation_perturbation: float = 0.0
    camera_rotation_perturbation: float = 0.0
    depth_noise: str = "none"

    def __post_init__(self):
        super().__post_init__()
        check_perturbation(self.instruction_perturbation)
        check_camera_perturbation(
            self.camera_translation_perturbation,
            self.camera_rotation_perturbation,
            MAX_CAMERA_TRANSLATION_PERTURBATION,
        )
        check_depth_noise(self.depth_noise)
        h, w = self.observation_height, self.observation_width
        # Typed as `dataset_to_policy_features` types a recording: the depth map VISUAL (it is a LeRobot
        # depth-map image there), the camera matrices STATE (float features).
        geometry = {DEPTH: (FeatureType.VISUAL, (1, h, w))}
        geometry.update({entry: (FeatureType.STATE, shape) for entry, shape in CAMERA_MATRIX_SHAPES.items()})
        for camera in self.camera_names():
            for entry, (feature_type, shape) in geometry.items():
                self.features[env_geometry_entry(entry, camera)] = PolicyFeature(
                    type=feature_type, shape=shape
                )
                self.features_map[env_geometry_entry(entry, camera)] = geometry_key(entry, camera)

    def camera_names(self) -> list[str]:
        """Mapped camera names (``image``, ``image2`` by default) in ``camera_name`` order."""
        mapping = self.camera_name_mapping or _DEFAULT_CAMERA_NAME_MAPPING
        return [mapping[camera] for camera in parse_camera_names(self.camera_name)]

    @property
    def gym_kwargs(self) -> dict:
        return {
            **super().gym_kwargs,
            "instruction_perturbation": self.instruction_perturbation,
            "camera_translation_perturbation": self.camera_translation_perturbation,
            "camera_rotation_perturbation": self.camera_rotation_perturbation,
            "depth_noise": self.depth_noise,
        }

    def create_envs(self, n_envs: int, use_async_envs: bool = False):
        return create_libero_rgbd_envs(self, n_envs=n_envs, use_async_envs=use_async_envs)

    def get_env_processors(self):
        return (
            PolicyProcessorPipeline(steps=[LiberoProcessorStep(), LiberoRGBDProcessorStep()]),
            PolicyProcessorPipeline(steps=[]),
        )
