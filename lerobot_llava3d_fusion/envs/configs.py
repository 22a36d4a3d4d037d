"""LeRobot integration of the touch-block env: `--env.type=touch_block` and its env processor.

How the camera geometry reaches the policy during `lerobot-eval` / `lerobot-train` evaluation:
the env returns top-level arrays ``depth`` (1, H, W), ``intrinsics`` (3, 3) and ``extrinsics``
(4, 4) next to ``pixels`` and ``agent_pos``. LeRobot's `preprocess_observation` passes unknown
top-level arrays through as float32 tensors ``observation.<key>`` (batched by the vector env), and
`TouchBlockProcessorStep` (the env preprocessor) renames them to the per-camera keys used by the
dataset: ``observation.depth.top``, ``observation.intrinsics.top``, ``observation.extrinsics.top``.
The instruction reaches the policy through the env's ``task_description`` attribute, which
LeRobot's rollout reads with ``env.call("task_description")`` and stores under ``task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.processor import ObservationProcessorStep, PolicyProcessorPipeline
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE

from lerobot_llava3d_fusion.envs import touch_block  # registers the gymnasium id
from lerobot_llava3d_fusion.envs.registration import env_type, processor_step
from lerobot_llava3d_fusion.geometry.depth_noise import check_depth_noise
from lerobot_llava3d_fusion.observation_keys import (
    CAMERA_MATRIX_SHAPES,
    DEPTH,
    GEOMETRY_ENTRIES,
    env_geometry_entry,
    env_geometry_key,
    geometry_key,
    parse_env_geometry_key,
)

# Dims of each geometry entry without the batch dim: depth (1, H, W), matrices (3, 3) / (4, 4).
_UNBATCHED_NDIMS = {DEPTH: 3, **{entry: len(shape) for entry, shape in CAMERA_MATRIX_SHAPES.items()}}


@dataclass
@processor_step("touch_block_camera_geometry")
class TouchBlockProcessorStep(ObservationProcessorStep):
    """Moves `observation.{depth,intrinsics,extrinsics}` to `observation.<entry>.<camera>`.

    Inputs (as produced by `preprocess_observation` from a vector env): depth (B, 1, H, W),
    intrinsics (B, 3, 3), extrinsics (B, 4, 4); unbatched inputs get a batch dimension. Outputs are
    float32. Observations that already use the per-camera keys pass through unchanged.
    """

    camera: str = touch_block.CAMERA_NAME

    def observation(self, observation: dict) -> dict:
        for entry in GEOMETRY_ENTRIES:
            source, ndim = env_geometry_key(entry), _UNBATCHED_NDIMS[entry]
            if source not in observation:
                continue
            value = torch.as_tensor(observation.pop(source)).to(torch.float32)
            if value.dim() == ndim:
                value = value.unsqueeze(0)
            if value.dim() != ndim + 1:
                raise ValueError(f"{source} must have {ndim} (or {ndim + 1} batched) dims, got {value.shape}")
            observation[geometry_key(entry, self.camera)] = value
        return observation

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        observation_features = features.get(PipelineFeatureType.OBSERVATION, {})
        renamed = {}
        for key, feature in observation_features.items():
            parsed = parse_env_geometry_key(key)
            if parsed is not None and parsed[1] is None:  # `observation.<entry>` of the env's one camera
                key = geometry_key(parsed[0], self.camera)
            renamed[key] = feature
        return {**features, PipelineFeatureType.OBSERVATION: renamed}

    def get_config(self) -> dict:
        return {"camera": self.camera}


@env_type("touch_block")
@dataclass
class TouchBlockEnvConfig(EnvConfig):
    """`--env.type=touch_block`: move to, and hold at, the top of the block named by the instruction.

    `features` are keyed by env observation names and `features_map` gives the policy keys, as for
    LeRobot's own envs. Depth is a VISUAL feature (the dataset stores it as a LeRobot depth-map
    image) and the camera matrices are STATE features, as `dataset_to_policy_features` types them.

    `instruction_perturbation` (``none``, ``other_task``, ``shuffled``, ``empty``) replaces the
    instruction the policy receives; with ``other_task`` (another block of the scene)
    `success_target` judges success at the block the original instruction named (``original``) or
    at the one the policy was told (``instruction``). See `touch_block.TouchBlockEnv`.

    Robustness: `camera_translation_perturbation` (m, largest shift along each axis) and
    `camera_rotation_perturbation` (degrees, largest turn about each camera axis) move the camera at
    each reset, drawn from the reset seed (0: the nominal straight-down camera); `depth_noise`
    (``none`` or ``sensor``: a RealSense D400's noise, holes and millimetre steps).
    """

    task: str | None = "TouchBlock-v0"
    fps: int = touch_block.FPS
    episode_length: int = touch_block.DEFAULT_EPISODE_LENGTH
    observation_height: int = 64
    observation_width: int = 64
    num_blocks: int = 3
    max_step: float = 0.02
    success_radius: float = 0.015
    render_mode: str = "rgb_array"
    instruction_perturbation: str = "none"
    success_target: str = "original"
    camera_translation_perturbation: float = 0.0
    camera_rotation_perturbation: float = 0.0
    depth_noise: str = "none"
    features: dict[str, PolicyFeature] = field(
        default_factory=lambda: {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(3,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(3,)),
            **{
                env_geometry_entry(entry): PolicyFeature(type=FeatureType.STATE, shape=shape)
                for entry, shape in CAMERA_MATRIX_SHAPES.items()
            },
        }
    )
    features_map: dict[str, str] = field(
        default_factory=lambda: {
            ACTION: ACTION,
            "agent_pos": OBS_STATE,
            f"pixels/{touch_block.CAMERA_NAME}": f"{OBS_IMAGES}.{touch_block.CAMERA_NAME}",
            **{
                env_geometry_entry(entry): geometry_key(entry, touch_block.CAMERA_NAME)
                for entry in GEOMETRY_ENTRIES
            },
        }
    )

    def __post_init__(self):
        if self.task != "TouchBlock-v0":
            raise ValueError(f"touch_block has a single task 'TouchBlock-v0', got {self.task!r}")
        if self.fps != touch_block.FPS:
            raise ValueError(f"touch_block runs at {touch_block.FPS} fps, got {self.fps}")
        if self.episode_length < 1:
            raise ValueError(f"episode_length must be positive, got {self.episode_length}")
        touch_block.check_instruction_options(
            self.instruction_perturbation, self.success_target, self.num_blocks
        )
        touch_block.check_camera_options(self.camera_translation_perturbation, self.camera_rotation_perturbation)
        check_depth_noise(self.depth_noise)
        h, w = self.observation_height, self.observation_width
        self.features[f"pixels/{touch_block.CAMERA_NAME}"] = PolicyFeature(
            type=FeatureType.VISUAL, shape=(h, w, 3)
        )
        self.features[env_geometry_entry(DEPTH)] = PolicyFeature(type=FeatureType.VISUAL, shape=(1, h, w))

    @property
    def package_name(self) -> str:
        # The module whose import registers `gym_id` (already imported by this file).
        return touch_block.__name__

    @property
    def gym_id(self) -> str:
        return touch_block.GYM_ID

    @property
    def gym_kwargs(self) -> dict:
        return {
            "observation_height": self.observation_height,
            "observation_width": self.observation_width,
            "num_blocks": self.num_blocks,
            "max_step": self.max_step,
            "success_radius": self.success_radius,
            "render_mode": self.render_mode,
            "episode_length": self.episode_length,
            "instruction_perturbation": self.instruction_perturbation,
            "success_target": self.success_target,
            "camera_translation_perturbation": self.camera_translation_perturbation,
            "camera_rotation_perturbation": self.camera_rotation_perturbation,
            "depth_noise": self.depth_noise,
            "max_episode_steps": self.episode_length,
        }

    def get_env_processors(self):
        return (
            PolicyProcessorPipeline(steps=[TouchBlockProcessorStep()]),
            PolicyProcessorPipeline(steps=[]),
        )


def touch_block_eval_observation(seed: int, **env_options) -> dict:
    """One touch_block observation (env options as `--env.<name>`, the reset `seed`) after
    `preprocess_observation`, the task and the env processor: what lerobot-eval's rollout hands to
    the policy preprocessor."""
    from lerobot.envs.factory import make_env, make_env_config
    from lerobot.envs.utils import preprocess_observation

    env_cfg = make_env_config("touch_block", **env_options)
    envs = make_env(env_cfg, n_envs=1, use_async_envs=False)
    vec_env = next(iter(next(iter(envs.values())).values()))
    try:
        observation, _ = vec_env.reset(seed=[seed])
        observation = preprocess_observation(observation)
        observation["task"] = list(vec_env.call("task_description"))
        env_preprocessor, _ = env_cfg.get_env_processors()
        return env_preprocessor(observation)
    finally:
        vec_env.close()
