"""Record scripted-expert touch-block episodes as a local LeRobotDataset (LeRobot 0.6.1 format).

    python -m lerobot_llava3d_fusion.demo.make_touch_block_dataset \
        --root DIR --repo-id local/touch_block --episodes 200 --seed 0

The result is read offline with ``lerobot-train --dataset.repo_id=local/touch_block
--dataset.root=DIR``. Episode ``i`` replays the env reset with seed ``seed + i`` (with
``--every-block-as-target``, seed ``seed + i // num_blocks`` naming block ``i % num_blocks``); every
frame holds the observation before the expert's action and that action. An episode ends after the
expert has held still on the target for `HOLD_FRAMES` frames (zero actions: what a policy must learn to do
there); the expert always gets there well within the step budget, so a miss is reported as a bug.
``next.success`` marks the frames after which the end-effector is on the target.

``--near-target-starts F`` starts a fraction F of the episodes (drawn with ``--seed``) at the target
block's top-centre plus an offset drawn uniformly within ``NEAR_TARGET_START_EXTENT`` per axis,
instead of the env's start above every block: half of those starts are below the top, most of them
inside the block, where the end-effector is hidden from the camera. The expert's way back is
recorded as always, so the data shows what to do when a policy's own small errors take it off the
target; the action chunks stay deterministic (noise added to the executed actions would fill every
chunk with corrections of noise the policy never meets, and it would replay them).

Features (H x W from --height/--width):
    observation.images.top       image (or video) (H, W, 3) uint8
    observation.depth.top        LeRobot depth-map image (H, W, 1) float32, metres along the camera
                                 z axis (``depth_unit: "m"``), stored losslessly as raw TIFF
    observation.intrinsics.top   float32 (3, 3)
    observation.extrinsics.top   float32 (4, 4), camera-to-world
    observation.state            float32 (3,), end-effector xyz (world, m)
    action                       float32 (3,) in [-1, 1]
    next.reward / next.success / next.done   (1,) after the action
and the instruction as the frame's task.

LeRobot returns depth maps in millimetres unless told otherwise: train with
``--dataset.depth_output_unit=m`` (the demo preset sets it), since the policy reads metres, or with
``--policy.dataset_depth_unit=mm`` (needed with ``--dataset.streaming=true``, whose reader always
returns millimetres).

`meta/stats.json` follows LeRobot except for the camera matrices, whose stats take all their entries
as one channel, shaped (1, 1, 1), as in every dataset this package writes (see `dataset_stats.py`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import datasets
import gymnasium as gym
import numpy as np
from lerobot.datasets import LeRobotDataset
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE
from lerobot.utils.utils import init_logging
from tqdm import tqdm

from lerobot_llava3d_fusion.observation_keys import DEPTH, EXTRINSICS, INTRINSICS, camera_geometry_features, geometry_key
from lerobot_llava3d_fusion.envs import touch_block
from lerobot_llava3d_fusion.tools.dataset_stats import save_episode

logger = logging.getLogger(__name__)

IMAGE_KEY = f"{OBS_IMAGES}.{touch_block.CAMERA_NAME}"
DEPTH_KEY, INTRINSICS_KEY, EXTRINSICS_KEY = (
    geometry_key(entry, touch_block.CAMERA_NAME) for entry in (DEPTH, INTRINSICS, EXTRINSICS)
)
HOLD_FRAMES = 5  # zero-action frames on the target that close each expert episode
NEAR_TARGET_START_EXTENT = 0.03  # m: near-target starts are offset by up to this along each axis


def dataset_features(height: int, width: int, use_videos: bool = False) -> dict[str, dict]:
    """LeRobotDataset feature spec of the touch-block data contract."""
    return {
        IMAGE_KEY: {
            "dtype": "video" if use_videos else "image",
            "shape": (height, width, 3),
            "names": ["height", "width", "channels"],
        },
        **camera_geometry_features(touch_block.CAMERA_NAME, height, width),
        OBS_STATE: {"dtype": "float32", "shape": (3,), "names": ["x", "y", "z"]},
        ACTION: {"dtype": "float32", "shape": (3,), "names": ["dx", "dy", "dz"]},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
        "next.done": {"dtype": "bool", "shape": (1,), "names": None},
    }


def make_touch_block_dataset(
    root: str | Path,
    repo_id: str,
    num_episodes: int,
    seed: int,
    height: int = 64,
    width: int = 64,
    use_videos: bool = False,
    num_blocks: int = 3,
    every_block_as_target: bool = False,
    near_target_starts: float = 0.0,
    camera_translation_perturbation: float = 0.0,
    camera_rotation_perturbation: float = 0.0,
) -> LeRobotDataset:
    """Writes `num_episodes` expert episodes to a new dataset at `root` (which must not exist);
    `num_blocks` blocks per scene (train and evaluate with the same `--env.num_blocks`).

    With `every_block_as_target`, each scene is recorded once per block, each time with the
    instruction naming that block: episode i replays seed `seed + i // num_blocks` with target
    `i % num_blocks`. The first frames of those episodes are the same image and state with different
    instructions and actions, so nothing but the instruction tells them apart.

    `near_target_starts`: the fraction of episodes that start near the target's top instead (module
    docstring); which ones, and their offsets, are drawn from a generator seeded with `seed`.

    `camera_translation_perturbation` (m) / `camera_rotation_perturbation` (degrees): the camera is
    moved in each episode as the env's options of those names move it (drawn from the episode's
    seed; every frame records the camera matrices of its view)."""
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be positive, got {num_episodes}")
    if not 0.0 <= near_target_starts <= 1.0:  # also refuses NaN
        raise ValueError(f"near_target_starts must be a fraction in [0, 1], got {near_target_starts}")
    root = Path(root)
    if root.exists():
        raise ValueError(f"dataset root {root} already exists; choose a new directory")

    env = gym.make(
        touch_block.GYM_ID,
        observation_height=height,
        observation_width=width,
        num_blocks=num_blocks,
        camera_translation_perturbation=camera_translation_perturbation,
        camera_rotation_perturbation=camera_rotation_perturbation,
    )
    sim: touch_block.TouchBlockEnv = env.unwrapped
    dataset = LeRobotDataset.create(
        repo_id=repo_id,
        fps=touch_block.FPS,
        features=dataset_features(height, width, use_videos),
        root=root,
        robot_type="touch_block_point",
        use_videos=use_videos,
    )
    start_rng = np.random.default_rng(seed)
    near_target = start_rng.random(num_episodes) < near_target_starts
    offsets = start_rng.uniform(-NEAR_TARGET_START_EXTENT, NEAR_TARGET_START_EXTENT, (num_episodes, 3))
    start, num_frames = time.perf_counter(), 0
    try:
        for episode in tqdm(range(num_episodes), desc="touch_block episodes", unit="ep"):
            options = {"start_offset": offsets[episode]} if near_target[episode] else {}
            if every_block_as_target:
                options["target_block"] = episode % num_blocks
                obs, _ = env.reset(seed=seed + episode // num_blocks, options=options)
            else:
                obs, _ = env.reset(seed=seed + episode, options=options)
            task = sim.task_description
            done, held = False, 0
            while not done:
                action = touch_block.expert_action(sim.ee_position, sim.target_position, sim.max_step)
                next_obs, reward, terminated, truncated, info = env.step(action)
                held = held + 1 if info["at_target"] and not action.any() else 0
                done = held >= HOLD_FRAMES or terminated or truncated
                dataset.add_frame(
                    {
                        IMAGE_KEY: obs["pixels"][touch_block.CAMERA_NAME],
                        DEPTH_KEY: obs[touch_block.DEPTH_ENTRY].transpose(1, 2, 0),  # (H, W, 1)
                        INTRINSICS_KEY: obs[touch_block.INTRINSICS_ENTRY],
                        EXTRINSICS_KEY: obs[touch_block.EXTRINSICS_ENTRY],
                        OBS_STATE: obs["agent_pos"],
                        ACTION: action,
                        "next.reward": np.array([reward], dtype=np.float32),
                        "next.success": np.array([info["at_target"]]),
                        "next.done": np.array([done]),
                        "task": task,
                    }
                )
                obs = next_obs
                num_frames += 1
            if held < HOLD_FRAMES:
                raise RuntimeError(f"scripted expert failed on seed {seed + episode}; this is a bug")
            save_episode(dataset)
    finally:
        dataset.finalize()
        env.close()
    elapsed = time.perf_counter() - start
    logger.info(
        "Wrote %d episodes / %d frames to %s in %.1fs (%.0f frames/s)",
        num_episodes,
        num_frames,
        root,
        elapsed,
        num_frames / elapsed,
    )
    return dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="dataset directory to create")
    parser.add_argument("--repo-id", default="local/touch_block")
    parser.add_argument("--episodes", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0, help="episode i uses env seed `seed + i`")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=3, help="blocks per scene (as --env.num_blocks)")
    parser.add_argument(
        "--every-block-as-target",
        action="store_true",
        help="record each scene once per block, naming each block in turn (episode i: seed + i // "
        "num_blocks, target block i %% num_blocks)",
    )
    parser.add_argument(
        "--near-target-starts",
        type=float,
        default=0.0,
        help="fraction of the episodes that start within "
        f"{NEAR_TARGET_START_EXTENT * 100:g} cm (per axis) of the target's top, above or inside the block, "
        "so the data shows the way back to the target (default 0: every episode starts above the blocks)",
    )
    parser.add_argument(
        "--video", action="store_true", help="store RGB as (lossy) video instead of lossless PNG images"
    )
    args = parser.parse_args(argv)
    init_logging()
    # One progress bar (episodes) instead of one `datasets` bar per saved episode.
    datasets.disable_progress_bars()
    make_touch_block_dataset(
        root=args.root,
        repo_id=args.repo_id,
        num_episodes=args.episodes,
        seed=args.seed,
        height=args.height,
        width=args.width,
        use_videos=args.video,
        num_blocks=args.num_blocks,
        every_block_as_target=args.every_block_as_target,
        near_target_starts=args.near_target_starts,
    )


if __name__ == "__main__":
    main()
