"""Simulator side of the ``libero_rgbd`` env: LeRobot's ``LiberoEnv`` with metric depth and cameras.

This module imports ``lerobot.envs.libero`` and therefore ``libero.libero``, which reads the LIBERO
config at import time, so it first runs :func:`ensure_libero_ready`. It is kept apart from
:mod:`lerobot_llava3d_fusion.envs.libero_rgbd` (config, processor step, recorder) so that registering
the env type at package import needs neither LIBERO nor a config file.

Raw observation (one sub-env, before ``preprocess_observation``), per camera with mapped name ``cam``
(``image`` = agent view, ``image2`` = wrist), in addition to LeRobot's ``pixels`` / ``robot_state``:

- ``depth_<cam>``: float32 (H, W, 1), metres along the camera's optical axis, 0 where nothing was
  rendered; same pixel grid as ``pixels[cam]`` (robosuite's, i.e. upside down for OpenGL).
- ``intrinsics_<cam>``: float32 (3, 3), OpenCV-style ``K`` for that raw pixel grid.
- ``extrinsics_<cam>``: float32 (4, 4), camera-to-world pose of the OpenCV camera frame
  (x right, y down, z forward) in the MuJoCo world frame.

``LiberoRGBDProcessorStep`` later rotates the depth and adapts ``K`` exactly as LeRobot rotates the
RGB images.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from lerobot_llava3d_fusion.libero_setup import ensure_libero_ready

ensure_libero_ready()  # must precede the first `import libero.libero` (config file, assets, MUJOCO_GL)

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402
from lerobot.envs.libero import LiberoEnv, _get_suite, _select_task_ids  # noqa: E402
from lerobot.envs.utils import _LazyAsyncVectorEnv  # noqa: E402
from libero.libero.envs import OffScreenRenderEnv  # noqa: E402
from robosuite import macros as robosuite_macros  # noqa: E402
from robosuite.utils.camera_utils import (  # noqa: E402
    get_camera_extrinsic_matrix,
    get_camera_intrinsic_matrix,
    get_real_depth_map,
)

from lerobot_llava3d_fusion.envs.instruction_perturbation import perturb_instruction  # noqa: E402
from lerobot_llava3d_fusion.envs.libero_rgbd import (  # noqa: E402
    RAW_DEPTH_PREFIX,
    RAW_EXTRINSICS_PREFIX,
    RAW_INTRINSICS_PREFIX,
    LiberoRGBDEnvConfig,
    flip_intrinsics,
)

logger = logging.getLogger(__name__)


def _robosuite_camera(obs_camera_name: str) -> str:
    """``agentview_image`` -> ``agentview`` (LeRobot names cameras by their robosuite obs key)."""
    return obs_camera_name.removesuffix("_image")


class LiberoRGBDEnv(LiberoEnv):
    """LeRobot's LIBERO gym env, rendering depth too and reporting each camera's geometry.

    Same constructor arguments as ``lerobot.envs.libero.LiberoEnv``, plus `instruction_perturbation`
    (see :mod:`.instruction_perturbation`; ``other_task`` draws from the suite's other tasks), applied
    to ``task_description`` once, with a generator seeded by the task id. Costs about 3 ms more per
    step than the RGB-only env (MuJoCo reads the depth buffer of the render it already does).
    """

    def __init__(self, task_suite: Any, *args: Any, instruction_perturbation: str = "none", **kwargs: Any):
        super().__init__(task_suite, *args, **kwargs)
        self.task_description = perturb_instruction(
            self.task_description,
            instruction_perturbation,
            np.random.default_rng(self.task_id),
            other_instructions=[task.language for task in task_suite.tasks],
        )
        h, w = self.observation_height, self.observation_width
        geometry_spaces = {}
        for camera in self.camera_name:
            name = self.camera_name_mapping[camera]
            geometry_spaces[f"{RAW_DEPTH_PREFIX}{name}"] = spaces.Box(0.0, np.inf, (h, w, 1), np.float32)
            geometry_spaces[f"{RAW_INTRINSICS_PREFIX}{name}"] = spaces.Box(
                -np.inf, np.inf, (3, 3), np.float32
            )
            geometry_spaces[f"{RAW_EXTRINSICS_PREFIX}{name}"] = spaces.Box(
                -np.inf, np.inf, (4, 4), np.float32
            )
        self.observation_space = spaces.Dict({**self.observation_space.spaces, **geometry_spaces})
        # robosuite returns images bottom row first under its default "opengl" convention.
        self._raw_rows_flipped = robosuite_macros.IMAGE_CONVENTION == "opengl"

    def _ensure_env(self) -> None:
        """As ``LiberoEnv._ensure_env`` (lazy, inside the worker process) plus ``camera_depths=True``."""
        if self._env is not None:
            return
        env = OffScreenRenderEnv(
            bddl_file_name=self._task_bddl_file,
            camera_heights=self.observation_height,
            camera_widths=self.observation_width,
            camera_depths=True,
            control_freq=self.control_freq,
            hard_reset=self.hard_reset,
        )
        env.reset()
        self._env = env

    def _format_raw_obs(self, raw_obs: dict[str, Any]) -> dict[str, Any]:
        observation = super()._format_raw_obs(raw_obs)
        observation.update(self._camera_geometry(raw_obs))
        return observation

    def _camera_geometry(self, raw_obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Metric depth (H, W, 1), ``K`` (3, 3) and camera-to-world (4, 4) per camera, raw pixel grid."""
        sim = self._env.sim
        h, w = self.observation_height, self.observation_width
        geometry = {}
        for camera in self.camera_name:
            rs_camera = _robosuite_camera(camera)
            name = self.camera_name_mapping[camera]

            normalized = raw_obs[f"{rs_camera}_depth"]  # (H, W, 1) in [0, 1], 1 = far clipping plane
            depth = get_real_depth_map(sim, normalized).astype(np.float32)
            depth[normalized >= 1.0] = 0.0  # nothing was rendered there: mark invalid

            k_opencv = get_camera_intrinsic_matrix(sim, rs_camera, h, w)
            # robosuite puts the principal point at (W/2, H/2); with integer pixel-centre coordinates
            # MuJoCo's optical axis goes through the image centre ((W-1)/2, (H-1)/2). Half a pixel
            # matters little, but being exact also keeps the principal point invariant under flips.
            k_opencv[0, 2], k_opencv[1, 2] = (w - 1) / 2.0, (h - 1) / 2.0
            k_raw = flip_intrinsics(
                torch.from_numpy(k_opencv), h, w, flip_rows=self._raw_rows_flipped, flip_cols=False
            )

            geometry[f"{RAW_DEPTH_PREFIX}{name}"] = depth
            geometry[f"{RAW_INTRINSICS_PREFIX}{name}"] = k_raw.numpy().astype(np.float32)
            geometry[f"{RAW_EXTRINSICS_PREFIX}{name}"] = get_camera_extrinsic_matrix(sim, rs_camera).astype(
                np.float32
            )
        return geometry


def create_libero_rgbd_envs(
    cfg: LiberoRGBDEnvConfig, n_envs: int, use_async_envs: bool = False
) -> dict[str, dict[int, Any]]:
    """Build ``{suite: {task_id: VectorEnv}}`` of :class:`LiberoRGBDEnv`, like ``create_libero_envs``.

    LeRobot's ``create_libero_envs`` hard-codes its env class, so this mirrors its structure (same
    suite/task selection helpers, same vector-env kinds and autoreset mode) with ours.
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be a positive int; got {n_envs}")
    suite_names = [s.strip() for s in str(cfg.task).split(",") if s.strip()]
    if not suite_names:
        raise ValueError("`task` must contain at least one LIBERO suite name.")
    gym_kwargs = dict(cfg.gym_kwargs)
    gym_kwargs.pop("task_ids", None)  # selects tasks here; not an env constructor argument
    use_async = use_async_envs and n_envs > 1

    out: dict[str, dict[int, Any]] = {}
    for suite_name in suite_names:
        suite = _get_suite(suite_name)
        out[suite_name] = {}
        # All tasks of a suite share spaces: probe once so lazy async envs need no throwaway env.
        cached_spaces: tuple | None = None
        for task_id in _select_task_ids(len(suite.tasks), cfg.task_ids):
            fns = [
                partial(
                    LiberoRGBDEnv,
                    task_suite=suite,
                    task_id=task_id,
                    task_suite_name=suite_name,
                    camera_name=cfg.camera_name,
                    init_states=cfg.init_states,
                    episode_length=cfg.episode_length,
                    episode_index=episode_index,
                    n_envs=n_envs,
                    control_mode=cfg.control_mode,
                    camera_name_mapping=cfg.camera_name_mapping,
                    is_libero_plus=cfg.is_libero_plus,
                    **gym_kwargs,
                )
                for episode_index in range(n_envs)
            ]
            if use_async:
                vec_env = _LazyAsyncVectorEnv(fns, *(cached_spaces or (None, None, None)))
                cached_spaces = (vec_env.observation_space, vec_env.action_space, vec_env.metadata)
            else:
                vec_env = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
            out[suite_name][task_id] = vec_env
            logger.info(
                "Built libero_rgbd vec env | suite=%s | task_id=%d | n_envs=%d", suite_name, task_id, n_envs
            )
    return out
