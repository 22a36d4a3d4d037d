"""Record a small LIBERO RGB-D LeRobotDataset from the simulator, with smooth random actions.

For exercising pipelines (the actions teach nothing); real data comes from LIBERO's demonstrations
through ``llava3d-fusion-convert-libero``::

    python -m lerobot_llava3d_fusion.tools.record_libero_rgbd --root DIR --repo-id local/libero_rgbd \\
        --suite libero_spatial --task-ids 0 --episodes 2 --steps 20
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lerobot.datasets import LeRobotDataset
from lerobot.envs.utils import preprocess_observation
from tqdm import tqdm

from lerobot_llava3d_fusion.envs.libero_rgbd import LiberoRGBDEnvConfig
from lerobot_llava3d_fusion.tools.dataset_stats import save_episode
from lerobot_llava3d_fusion.tools.libero_rgbd_dataset import dataset_features, frame_from_batch

logger = logging.getLogger(__name__)


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
    cfg = LiberoRGBDEnvConfig(
        task=suite,
        task_ids=list(task_ids),
        observation_height=image_size,
        observation_width=image_size,
        episode_length=steps,
    )
    features = dataset_features(cfg)
    env_preprocessor, _ = cfg.get_env_processors()
    envs = cfg.create_envs(n_envs=1)[suite]  # sets LIBERO up on first use
    dataset = LeRobotDataset.create(
        repo_id=repo_id, fps=fps, features=features, root=root, robot_type="panda", use_videos=False
    )
    rng = np.random.default_rng(seed)
    total_frames = len(envs) * episodes * steps
    with tqdm(total=total_frames, desc="Recording", unit="frame") as bar:
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
                        dataset.add_frame(frame_from_batch(batch, features, action, task))
                        bar.update()
                        observation, _, terminated, truncated, _ = vec_env.step(action[None])
                        if terminated[0] or truncated[0]:
                            break
                    save_episode(dataset)
                    logger.info("Saved episode %d of task %d (%s)", episode, task_id, task)
        finally:
            for vec_env in envs.values():
                vec_env.close()
            dataset.finalize()
    return dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="dataset folder to create")
    parser.add_argument("--repo-id", default="local/libero_rgbd")
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--task-ids", type=int, nargs="+", default=[0])
    parser.add_argument("--episodes", type=int, default=2, help="episodes per task")
    parser.add_argument("--steps", type=int, default=20, help="frames per episode")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
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


if __name__ == "__main__":
    main()
