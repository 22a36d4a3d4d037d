"""Simulator side of the ``libero_rgbd`` env: LeRobot's ``LiberoEnv`` with metric depth and cameras.

Raw observation (one sub-env, before ``preprocess_observation``), per camera with mapped name ``cam``
(``image`` = agent view, ``image2`` = wrist), in addition to LeRobot's ``pixels`` / ``robot_state``:

- ``depth_<cam>``: float32 (H, W, 1), metres along the camera's optical axis, 0 where nothing was
  rendered; same pixel grid as ``pixels[cam]`` (robosuite's, i.e. upside down for OpenGL).
- ``intrinsics_<cam>``: float32 (3, 3), OpenCV-style ``K`` for that raw pixel grid.
- ``extrinsics_<cam>``: float32 (4, 4), camera-to-world pose of the OpenCV camera frame
  (x right, y down, z forward) in the MuJoCo world frame.

``LiberoRGBDProcessorStep`` (``libero_rgbd.py``) later rotates the depth and adapts ``K`` exactly as
LeRobot rotates the RGB images.

Importing LIBERO reads its config file (and asks for one on stdin when it is missing), so this module
imports it only when an env or a suite is first needed, after :func:`ensure_libero_ready` wrote that
config: importing the module itself touches nothing. ``LiberoRGBDEnv`` (LeRobot's ``LiberoEnv`` with
:class:`CameraGeometryMixin`) is therefore built on first use, by :func:`libero_rgbd_env_class` or by
reading the module attribute ``LiberoRGBDEnv``.

What this relies on in LeRobot (``tests/test_lerobot_libero_api.py`` pins it): the ``LiberoEnv``
constructor's arguments, its hooks ``_ensure_env()`` (builds LIBERO's ``OffScreenRenderEnv`` in the
worker process) and ``_format_raw_obs(raw_obs)`` (turns robosuite's observation into the gym one), and
``_LazyAsyncVectorEnv``: LeRobot's ``create_libero_envs`` hard-codes its env class, and its lazily
started async vector env (one task's worker processes alive at a time) has no public equivalent.
"""

from __future__ import annotations

import functools
import logging
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from lerobot.envs.configs import LiberoEnv as LiberoEnvConfig
from lerobot.envs.utils import _LazyAsyncVectorEnv

from lerobot_llava3d_fusion.envs.camera_perturbation import (
    check_camera_perturbation,
    draw_camera_perturbation,
)
from lerobot_llava3d_fusion.envs.instruction_perturbation import perturb_instruction
from lerobot_llava3d_fusion.geometry.depth_noise import check_depth_noise, sensor_depth_noise
from lerobot_llava3d_fusion.geometry.patch_points import flip_intrinsics
from lerobot_llava3d_fusion.observation_keys import (
    CAMERA_MATRIX_SHAPES,
    DEPTH,
    EXTRINSICS,
    INTRINSICS,
    env_geometry_entry,
)

logger = logging.getLogger(__name__)

MAX_CAMERA_TRANSLATION_PERTURBATION = 0.3  # m; LIBERO's agent view sees the table from about 1 m


def _robosuite_camera(obs_camera_name: str) -> str:
    """``agentview_image`` -> ``agentview`` (LeRobot names cameras by their robosuite obs key)."""
    return obs_camera_name.removesuffix("_image")


class CameraGeometryMixin:
    """What ``LiberoRGBDEnv`` adds to LeRobot's ``LiberoEnv``: depth rendering and each camera's geometry.

    Same constructor arguments as ``lerobot.envs.libero.LiberoEnv``, plus `instruction_perturbation`
    (see :mod:`.instruction_perturbation`; ``other_task`` draws from the suite's other tasks), applied
    to ``task_description`` once, with a generator seeded by the task id. Costs about 3 ms more per
    step than the RGB-only env (MuJoCo reads the depth buffer of the render it already does).

    Robustness options: `camera_translation_perturbation` (m) and `camera_rotation_perturbation`
    (degrees) move every fixed camera (mounted on the world, e.g. the agent view; not the wrist
    camera) in the simulator at each reset, from its pose in the task's scene, as
    :mod:`.camera_perturbation` draws it from the reset seed; the scene is then rendered again, and the
    reported extrinsics are read from the simulator, so they are those of the rendered view.
    `depth_noise="sensor"` makes every depth map what a RealSense D400 would report
    (:mod:`..geometry.depth_noise`), with a generator drawn from the reset seed.
    """

    def __init__(
        self,
        task_suite: Any,
        *args: Any,
        instruction_perturbation: str = "none",
        camera_translation_perturbation: float = 0.0,
        camera_rotation_perturbation: float = 0.0,
        depth_noise: str = "none",
        **kwargs: Any,
    ):
        check_camera_perturbation(
            camera_translation_perturbation, camera_rotation_perturbation, MAX_CAMERA_TRANSLATION_PERTURBATION
        )
        check_depth_noise(depth_noise)
        self.camera_translation_perturbation = camera_translation_perturbation
        self.camera_rotation_perturbation = camera_rotation_perturbation
        self.depth_noise = depth_noise
        # Scene poses (cam_pos, cam_quat) of the cameras moved at reset, read before the first move.
        self._scene_camera_poses: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._depth_noise_rng: np.random.Generator | None = None
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
            geometry_spaces[env_geometry_entry(DEPTH, name)] = spaces.Box(0.0, np.inf, (h, w, 1), np.float32)
            for entry, shape in CAMERA_MATRIX_SHAPES.items():
                geometry_spaces[env_geometry_entry(entry, name)] = spaces.Box(
                    -np.inf, np.inf, shape, np.float32
                )
        self.observation_space = spaces.Dict({**self.observation_space.spaces, **geometry_spaces})

    def _ensure_env(self) -> None:
        """As ``LiberoEnv._ensure_env`` (lazy, inside the worker process) plus ``camera_depths=True``."""
        if self._env is not None:
            return
        from libero.libero.envs import OffScreenRenderEnv

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

    @property
    def _moves_cameras(self) -> bool:
        return self.camera_translation_perturbation > 0 or self.camera_rotation_perturbation > 0

    def reset(self, seed: int | None = None, **kwargs: Any):
        """LeRobot's reset; then, with the robustness options, the moved cameras and a new depth-noise
        generator (both drawn from the seeded generator) and the observation rendered again."""
        observation, info = super().reset(seed=seed, **kwargs)
        if not self._moves_cameras and self.depth_noise == "none":
            return observation, info
        if self._moves_cameras:
            self._move_fixed_cameras()
        if self.depth_noise != "none":
            self._depth_noise_rng = np.random.default_rng(self.np_random.integers(2**63))
        self._env._update_observables(force=True)  # render the unchanged sim state again
        return self._format_raw_obs(self._env.env._get_observations()), info

    def _move_fixed_cameras(self) -> None:
        """Sets each fixed camera's MuJoCo pose to its scene pose moved by a fresh perturbation."""
        import mujoco

        model = self._env.sim.model
        for camera in self.camera_name:
            camera_id = model.camera_name2id(_robosuite_camera(camera))
            if model.cam_bodyid[camera_id] != 0:
                continue  # mounted on a moving body: the wrist camera stays where the robot holds it
            position, quaternion = self._scene_camera_poses.setdefault(
                camera_id, (model.cam_pos[camera_id].copy(), model.cam_quat[camera_id].copy())
            )
            shift, turn = draw_camera_perturbation(
                self.np_random, self.camera_translation_perturbation, self.camera_rotation_perturbation
            )
            rotation = np.empty(9)
            mujoco.mju_quat2Mat(rotation, quaternion)
            moved = np.empty(4)
            mujoco.mju_mat2Quat(moved, (rotation.reshape(3, 3) @ turn).reshape(9))
            model.cam_pos[camera_id] = position + shift
            model.cam_quat[camera_id] = moved
        self._env.sim.forward()  # camera world poses (cam_xpos, cam_xmat) from the new model values

    def _format_raw_obs(self, raw_obs: dict[str, Any]) -> dict[str, Any]:
        observation = super()._format_raw_obs(raw_obs)
        observation.update(self._camera_geometry(raw_obs))
        return observation

    def _camera_geometry(self, raw_obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Metric depth (H, W, 1), ``K`` (3, 3) and camera-to-world (4, 4) per camera, raw pixel grid."""
        from robosuite import macros as robosuite_macros
        from robosuite.utils.camera_utils import (
            get_camera_extrinsic_matrix,
            get_camera_intrinsic_matrix,
            get_real_depth_map,
        )

        sim = self._env.sim
        h, w = self.observation_height, self.observation_width
        # robosuite returns images bottom row first under its default "opengl" convention.
        raw_rows_flipped = robosuite_macros.IMAGE_CONVENTION == "opengl"
        geometry = {}
        for camera in self.camera_name:
            rs_camera = _robosuite_camera(camera)
            name = self.camera_name_mapping[camera]

            normalized = raw_obs[f"{rs_camera}_depth"]  # (H, W, 1) in [0, 1], 1 = far clipping plane
            depth = get_real_depth_map(sim, normalized).astype(np.float32)
            depth[normalized >= 1.0] = 0.0  # nothing was rendered there: mark invalid
            if self.depth_noise == "sensor" and self._depth_noise_rng is not None:
                depth[..., 0] = sensor_depth_noise(depth[..., 0], self._depth_noise_rng)

            k_opencv = get_camera_intrinsic_matrix(sim, rs_camera, h, w)
            # robosuite puts the principal point at (W/2, H/2); with integer pixel-centre coordinates
            # MuJoCo's optical axis goes through the image centre ((W-1)/2, (H-1)/2). Half a pixel
            # matters little, but being exact also keeps the principal point invariant under flips.
            k_opencv[0, 2], k_opencv[1, 2] = (w - 1) / 2.0, (h - 1) / 2.0
            k_raw = flip_intrinsics(
                torch.from_numpy(k_opencv), h, w, flip_rows=raw_rows_flipped, flip_cols=False
            )

            geometry[env_geometry_entry(DEPTH, name)] = depth
            geometry[env_geometry_entry(INTRINSICS, name)] = k_raw.numpy().astype(np.float32)
            geometry[env_geometry_entry(EXTRINSICS, name)] = get_camera_extrinsic_matrix(
                sim, rs_camera
            ).astype(np.float32)
        return geometry


@functools.cache
def libero_rgbd_env_class() -> type:
    """``LiberoRGBDEnv``: LeRobot's LIBERO gym env, rendering depth too and reporting each camera's geometry.

    Built once per process, after LIBERO is set up (its base class imports LIBERO).
    """
    _set_up_libero()
    from lerobot.envs.libero import LiberoEnv

    # Named after this module so that pickle (async vector envs) finds it again through `__getattr__`.
    return type("LiberoRGBDEnv", (CameraGeometryMixin, LiberoEnv), {"__module__": __name__})


def _set_up_libero() -> None:
    """LIBERO's config and assets (the set-up tool), loaded only when a LIBERO env or suite is first needed:
    registering the env type loads no tool."""
    from lerobot_llava3d_fusion.tools.libero_setup import ensure_libero_ready

    ensure_libero_ready()


def __getattr__(name: str) -> Any:
    if name == "LiberoRGBDEnv":
        return libero_rgbd_env_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def libero_suite(name: str) -> Any:
    """The LIBERO benchmark suite ``name`` (e.g. ``libero_spatial``), set up and imported on first use."""
    _set_up_libero()
    from libero.libero import benchmark

    suites = benchmark.get_benchmark_dict()
    if name not in suites:
        raise ValueError(f"Unknown LIBERO suite '{name}'. Available: {', '.join(sorted(suites))}")
    suite = suites[name]()
    if not getattr(suite, "tasks", None):
        raise ValueError(f"LIBERO suite '{name}' has no tasks.")
    return suite


def _task_ids(suite_name: str, num_tasks: int, task_ids: list[int] | None) -> list[int]:
    """The requested task ids of a suite (all of them for None), sorted and checked."""
    if task_ids is None:
        return list(range(num_tasks))
    ids = sorted({int(task_id) for task_id in task_ids})
    for task_id in ids:
        if not 0 <= task_id < num_tasks:
            raise ValueError(f"task_id {task_id} out of range [0, {num_tasks - 1}] for suite '{suite_name}'.")
    return ids


def create_libero_rgbd_envs(
    cfg: LiberoEnvConfig, n_envs: int, use_async_envs: bool = False
) -> dict[str, dict[int, Any]]:
    """Build ``{suite: {task_id: VectorEnv}}`` of ``LiberoRGBDEnv``, as ``create_libero_envs`` does with its own.

    Same suite and task selection, sub-env arguments, vector-env kinds and autoreset mode as LeRobot's
    function, which cannot be given another env class.
    """
    if n_envs < 1:
        raise ValueError(f"n_envs must be a positive int; got {n_envs}")
    suite_names = [s.strip() for s in str(cfg.task).split(",") if s.strip()]
    if not suite_names:
        raise ValueError("`task` must contain at least one LIBERO suite name.")
    env_class = libero_rgbd_env_class()
    gym_kwargs = dict(cfg.gym_kwargs)
    gym_kwargs.pop("task_ids", None)  # selects tasks here; not an env constructor argument
    use_async = use_async_envs and n_envs > 1

    out: dict[str, dict[int, Any]] = {}
    for suite_name in suite_names:
        suite = libero_suite(suite_name)
        out[suite_name] = {}
        # All tasks of a suite share spaces: probe once so lazy async envs need no throwaway env.
        cached_spaces: tuple | None = None
        for task_id in _task_ids(suite_name, len(suite.tasks), cfg.task_ids):
            fns = [
                partial(
                    env_class,
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
