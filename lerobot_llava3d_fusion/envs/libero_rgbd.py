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

``lerobot_llava3d_fusion.geometry.backproject_depth(depth, K, extrinsics)`` turns these into world points.

Route through LeRobot: the gym env (:mod:`.libero_rgbd_sim`) adds top-level arrays
``depth_<cam>`` / ``intrinsics_<cam>`` / ``extrinsics_<cam>`` to its observation;
``preprocess_observation`` passes unknown top-level arrays through as ``observation.<key>`` float
tensors; :class:`LiberoRGBDProcessorStep` (registered as ``libero_rgbd_processor`` and returned by
``get_env_processors`` after LeRobot's ``LiberoProcessorStep``) rotates depth like the images, adapts
``K`` to the rotation and moves everything to the keys above.

Importing this module needs neither LIBERO nor its config; the simulator module is imported when
envs are created. It also holds a small recorder of LeRobot datasets from the sim (pipeline tests)::

    python -m lerobot_llava3d_fusion.envs.libero_rgbd record --root DIR --repo-id local/libero_rgbd \\
        --suite libero_spatial --task-ids 0 --episodes 2 --steps 20
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m` runs this file as `__main__`, a second copy of the module next to the one the
    # package imports: defining the classes again would register `libero_rgbd` and its processor
    # step twice (a ValueError), so hand over to the imported module's CLI instead.
    from lerobot_llava3d_fusion.envs.libero_rgbd import main

    raise SystemExit(main())

import argparse
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.envs.configs import LiberoEnv
from lerobot.envs.utils import parse_camera_names
from lerobot.processor import LiberoProcessorStep, PolicyProcessorPipeline
from lerobot.processor.pipeline import ObservationProcessorStep
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE, OBS_STR

from .instruction_perturbation import check_perturbation
from .registration import env_type, processor_step

if TYPE_CHECKING:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

logger = logging.getLogger(__name__)

# Keys of the raw gym observation (top level, so `preprocess_observation` keeps them as
# `observation.<prefix><cam>`), followed by the camera's mapped name (`image`, `image2`).
RAW_DEPTH_PREFIX = "depth_"
RAW_INTRINSICS_PREFIX = "intrinsics_"
RAW_EXTRINSICS_PREFIX = "extrinsics_"

# Keys the policy receives, followed by `.<cam>`.
OBS_DEPTH = f"{OBS_STR}.depth"
OBS_INTRINSICS = f"{OBS_STR}.intrinsics"
OBS_EXTRINSICS = f"{OBS_STR}.extrinsics"

# LeRobot's LiberoEnv maps robosuite camera obs keys to these names when no mapping is given.
_DEFAULT_CAMERA_NAME_MAPPING = {"agentview_image": "image", "robot0_eye_in_hand_image": "image2"}

STATE_NAMES = ["eef_x", "eef_y", "eef_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z",
               "gripper_qpos_left", "gripper_qpos_right"]  # fmt: skip
ACTION_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]


def flip_intrinsics(
    intrinsics: torch.Tensor, height: int, width: int, flip_rows: bool, flip_cols: bool
) -> torch.Tensor:
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
        depth_prefix = f"{OBS_STR}.{RAW_DEPTH_PREFIX}"
        for depth_key in [key for key in observation if key.startswith(depth_prefix)]:
            camera = depth_key.removeprefix(depth_prefix)
            depth = observation.pop(depth_key)
            intrinsics = observation.pop(f"{OBS_STR}.{RAW_INTRINSICS_PREFIX}{camera}")
            extrinsics = observation.pop(f"{OBS_STR}.{RAW_EXTRINSICS_PREFIX}{camera}")
            if depth.ndim != 4:
                raise ValueError(
                    f"{depth_key}: expected a batched (B, H, W, 1) depth map, got {tuple(depth.shape)}"
                )
            # Same rotation as LiberoProcessorStep applies to the images (flip H and W).
            depth = torch.flip(depth.permute(0, 3, 1, 2), dims=[2, 3]).float().contiguous()
            height, width = depth.shape[-2:]
            observation[f"{OBS_DEPTH}.{camera}"] = depth
            observation[f"{OBS_INTRINSICS}.{camera}"] = flip_intrinsics(
                intrinsics.float(), height, width, flip_rows=True, flip_cols=True
            )
            observation[f"{OBS_EXTRINSICS}.{camera}"] = extrinsics.float()
        return observation

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        observation = features.get(PipelineFeatureType.OBSERVATION)
        if not observation:
            return features
        renamed = {}
        for key, feature in observation.items():
            for raw_prefix, new_prefix in (
                (RAW_DEPTH_PREFIX, OBS_DEPTH),
                (RAW_INTRINSICS_PREFIX, OBS_INTRINSICS),
                (RAW_EXTRINSICS_PREFIX, OBS_EXTRINSICS),
            ):
                prefix = f"{OBS_STR}.{raw_prefix}"
                if key.startswith(prefix):
                    shape = feature.shape
                    if raw_prefix == RAW_DEPTH_PREFIX and len(shape) == 3 and shape[-1] == 1:
                        shape = (1, shape[0], shape[1])  # (H, W, 1) -> (1, H, W)
                    renamed[f"{new_prefix}.{key.removeprefix(prefix)}"] = PolicyFeature(feature.type, shape)
                    break
            else:
                renamed[key] = feature
        return {**features, PipelineFeatureType.OBSERVATION: renamed}


@env_type("libero_rgbd")
@dataclass
class LiberoRGBDEnvConfig(LiberoEnv):
    """LeRobot's ``libero`` env config (same options) whose envs also deliver depth and cameras.

    `instruction_perturbation` (``none``, ``other_task``: another task of the suite, ``shuffled``,
    ``empty``) replaces the instruction the policy receives; success stays the task's own.
    """

    instruction_perturbation: str = "none"

    def __post_init__(self):
        super().__post_init__()
        check_perturbation(self.instruction_perturbation)
        h, w = self.observation_height, self.observation_width
        for camera in self.camera_names():
            # Typed as `dataset_to_policy_features` types a recording: the depth map VISUAL (it is
            # a LeRobot depth-map image there), the camera matrices STATE (float features).
            for raw_prefix, obs_prefix, feature_type, shape in (
                (RAW_DEPTH_PREFIX, OBS_DEPTH, FeatureType.VISUAL, (1, h, w)),
                (RAW_INTRINSICS_PREFIX, OBS_INTRINSICS, FeatureType.STATE, (3, 3)),
                (RAW_EXTRINSICS_PREFIX, OBS_EXTRINSICS, FeatureType.STATE, (4, 4)),
            ):
                self.features[f"{raw_prefix}{camera}"] = PolicyFeature(type=feature_type, shape=shape)
                self.features_map[f"{raw_prefix}{camera}"] = f"{obs_prefix}.{camera}"

    def camera_names(self) -> list[str]:
        """Mapped camera names (``image``, ``image2`` by default) in ``camera_name`` order."""
        mapping = self.camera_name_mapping or _DEFAULT_CAMERA_NAME_MAPPING
        return [mapping[camera] for camera in parse_camera_names(self.camera_name)]

    @property
    def gym_kwargs(self) -> dict:
        return {**super().gym_kwargs, "instruction_perturbation": self.instruction_perturbation}

    def create_envs(self, n_envs: int, use_async_envs: bool = False):
        # Imported here: the simulator module imports LIBERO, which needs its config written first.
        from lerobot_llava3d_fusion.envs.libero_rgbd_sim import create_libero_rgbd_envs

        return create_libero_rgbd_envs(self, n_envs=n_envs, use_async_envs=use_async_envs)

    def get_env_processors(self):
        return (
            PolicyProcessorPipeline(steps=[LiberoProcessorStep(), LiberoRGBDProcessorStep()]),
            PolicyProcessorPipeline(steps=[]),
        )


# ---- Recorder -------------------------------------------------------------------------------------


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
        # LeRobot's depth-map image: float32 metres, stored losslessly (raw TIFF).
        features[f"{OBS_DEPTH}.{camera}"] = {
            "dtype": "image",
            "shape": (h, w, 1),
            "names": ["height", "width", "channels"],
            "info": {"is_depth_map": True, "depth_unit": "m"},
        }
        features[f"{OBS_INTRINSICS}.{camera}"] = {"dtype": "float32", "shape": (3, 3), "names": None}
        features[f"{OBS_EXTRINSICS}.{camera}"] = {"dtype": "float32", "shape": (4, 4), "names": None}
    return features


class SmoothRandomController:
    """Random but smooth 7-d delta actions, for exercising pipelines (not for learning).

    Translation and rotation follow a first-order low-pass of Gaussian noise (rotation scaled down
    so the arm does not spin); the gripper is open for the first half of an episode, then closed.
    """

    def __init__(self, episode_steps: int, rng: np.random.Generator, smoothing: float = 0.8):
        self.episode_steps = episode_steps
        self.rng = rng
        self.smoothing = smoothing
        self._motion = np.zeros(6)
        self._step = 0

    def __call__(self) -> np.ndarray:
        """Next action, float32 (7,) in [-1, 1]."""
        noise = self.rng.normal(0.0, 0.5, size=6) * np.array([1, 1, 1, 0.2, 0.2, 0.2])
        self._motion = self.smoothing * self._motion + (1 - self.smoothing) * noise
        gripper = -1.0 if self._step < self.episode_steps // 2 else 1.0  # LIBERO: -1 open, +1 close
        self._step += 1
        return np.clip(np.append(self._motion, gripper), -1.0, 1.0).astype(np.float32)


def _frame_from_batch(
    batch: dict[str, Any], features: dict[str, dict], action: np.ndarray, task: str
) -> dict:
    """One dataset frame from a processed observation batch of size 1."""
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


@contextmanager
def _scalar_camera_matrix_stats(matrix_keys: Sequence[str]) -> Iterator[None]:
    """Give the camera-matrix features scalar stats of shape (1, 1, 1) while recording.

    LeRobot 0.6.1 checks, when it aggregates per-episode stats (from the second episode on), that
    every feature whose key contains "image" has (3, 1, 1) or (1, 1, 1) stats, assuming it is a
    camera; ``observation.intrinsics.image`` and ``observation.extrinsics.image`` are float
    features and would get per-last-axis stats ((3,) for ``K``), so saving the second episode
    raises. (Normalizing them is meaningless anyway: the policy never does.) The depth maps are
    LeRobot depth-map images and get LeRobot's own per-channel stats. The dataset writer looks the
    function up in its module at call time, hence the swap there.
    """
    from lerobot.datasets import dataset_writer
    from lerobot.datasets.compute_stats import get_feature_stats

    compute_episode_stats = dataset_writer.compute_episode_stats

    def compute_with_channel_stats(episode_data: dict, features: dict, *args: Any, **kwargs: Any) -> dict:
        stats = compute_episode_stats(episode_data, features, *args, **kwargs)
        for key in matrix_keys:
            values = np.asarray(episode_data[key])[:, None]  # (N, 3, 3) or (N, 4, 4): one "channel"
            channel_stats = get_feature_stats(values, axis=(0, 2, 3), keepdims=True)
            stats[key] = {k: v if k == "count" else v[0] for k, v in channel_stats.items()}
        return stats

    dataset_writer.compute_episode_stats = compute_with_channel_stats
    try:
        yield
    finally:
        dataset_writer.compute_episode_stats = compute_episode_stats


def record_dataset(
    root: str | Path,
    repo_id: str,
    suite: str = "libero_spatial",
    task_ids: Sequence[int] = (0,),
    episodes: int = 2,
    steps: int = 20,
    image_size: int = 256,
    fps: int = 10,
    seed: int = 0,
) -> LeRobotDataset:
    """Record a small LIBERO-format LeRobotDataset with depth and cameras from the simulator.

    Observations go through the same ``preprocess_observation`` + env processors as in
    ``lerobot-eval``, so recorded frames match what a policy sees at evaluation (rotated images,
    8-d state, rotated depth and matching intrinsics). ``fps`` is the dataset's label, as in the
    public LIBERO datasets (10); the simulator still runs at its 20 Hz control rate.

    Args:
        root: dataset folder to create (must not exist yet).
        repo_id: dataset id stored in its metadata, e.g. ``local/libero_rgbd``.
        task_ids: tasks of ``suite`` to record, ``episodes`` each (one init state per episode).
        steps: frames per episode (fewer if the task terminates first).
        image_size: square image / depth size in pixels.
    Returns:
        The finalized dataset (read it back with ``LeRobotDataset(repo_id, root=root)``).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.envs.utils import preprocess_observation
    from tqdm import tqdm

    cfg = LiberoRGBDEnvConfig(
        task=suite,
        task_ids=list(task_ids),
        observation_height=image_size,
        observation_width=image_size,
        episode_length=steps,
    )
    features = dataset_features(cfg)
    env_preprocessor, _ = cfg.get_env_processors()
    dataset = LeRobotDataset.create(
        repo_id=repo_id, fps=fps, features=features, root=root, robot_type="panda", use_videos=False
    )
    rng = np.random.default_rng(seed)
    envs = cfg.create_envs(n_envs=1)[suite]
    matrix_keys = [k for k in features if k.startswith((f"{OBS_INTRINSICS}.", f"{OBS_EXTRINSICS}."))]
    total_frames = len(envs) * episodes * steps
    with (
        _scalar_camera_matrix_stats(matrix_keys),
        tqdm(total=total_frames, desc="Recording", unit="frame") as bar,
    ):
        try:
            for task_id, vec_env in envs.items():
                task = vec_env.call("task_description")[0]
                for episode in range(episodes):
                    observation, _ = vec_env.reset(seed=seed + episode)
                    controller = SmoothRandomController(steps, rng)
                    for _ in range(steps):
                        batch = preprocess_observation(observation)
                        batch["task"] = [task]
                        batch = env_preprocessor(batch)
                        action = controller()
                        dataset.add_frame(_frame_from_batch(batch, features, action, task))
                        bar.update()
                        observation, _, terminated, truncated, _ = vec_env.step(action[None])
                        if terminated[0] or truncated[0]:
                            break
                    dataset.save_episode()
                    logger.info("Saved episode %d of task %d (%s)", episode, task_id, task)
        finally:
            for vec_env in envs.values():
                vec_env.close()
            dataset.finalize()
    return dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="libero_rgbd tools")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="record a small LeRobotDataset from the LIBERO simulator")
    rec.add_argument("--root", type=Path, required=True, help="dataset folder to create")
    rec.add_argument("--repo-id", default="local/libero_rgbd")
    rec.add_argument("--suite", default="libero_spatial")
    rec.add_argument("--task-ids", type=int, nargs="+", default=[0])
    rec.add_argument("--episodes", type=int, default=2, help="episodes per task")
    rec.add_argument("--steps", type=int, default=20, help="frames per episode")
    rec.add_argument("--image-size", type=int, default=256)
    rec.add_argument("--fps", type=int, default=10)
    rec.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    dataset = record_dataset(
        root=args.root,
        repo_id=args.repo_id,
        suite=args.suite,
        task_ids=args.task_ids,
        episodes=args.episodes,
        steps=args.steps,
        image_size=args.image_size,
        fps=args.fps,
        seed=args.seed,
    )
    logger.info(
        "Recorded %d episodes, %d frames to %s",
        dataset.meta.total_episodes,
        dataset.meta.total_frames,
        args.root,
    )
