"""Tests of the touch-block env, its LeRobot integration and its dataset command.

CPU only and offline (tests/conftest.py sets HF_HUB_OFFLINE=1 before LeRobot is imported).
"""

import re
from collections import Counter
from dataclasses import dataclass, replace

import draccus
import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.datasets import LeRobotDataset
from lerobot.envs import make_env, make_env_pre_post_processors, preprocess_observation
from lerobot.envs.configs import EnvConfig
from lerobot.envs.utils import env_to_policy_features
from lerobot.scripts.lerobot_eval import rollout
from lerobot.utils.feature_utils import dataset_to_policy_features
from torch import nn

from lerobot_llava3d_fusion.demo.make_touch_block_dataset import (
    HOLD_FRAMES,
    NEAR_TARGET_START_EXTENT,
    dataset_features,
    main,
    make_touch_block_dataset,
)
from lerobot_llava3d_fusion.demo.touch_block_outcomes import OutcomeSummary, run_until_each_ends
from lerobot_llava3d_fusion.envs import touch_block as tb
from lerobot_llava3d_fusion.envs.configs import TouchBlockEnvConfig, TouchBlockProcessorStep
from lerobot_llava3d_fusion.envs.instruction_perturbation import PERTURBATIONS

CONTRACT = {  # policy key -> (batch-free shape given H, W; dtype)
    "observation.images.top": (lambda h, w: (3, h, w), torch.float32),
    "observation.depth.top": (lambda h, w: (1, h, w), torch.float32),
    "observation.intrinsics.top": (lambda h, w: (3, 3), torch.float32),
    "observation.extrinsics.top": (lambda h, w: (4, 4), torch.float32),
    "observation.state": (lambda h, w: (3,), torch.float32),
}


def back_project(depth, k, e, rows, cols):
    """World points (3, N) of pixels (rows, cols) given intrinsics k and camera-to-world e."""
    z = depth[0, rows, cols]
    cam = np.stack([(cols - k[0, 2]) * z / k[0, 0], (rows - k[1, 2]) * z / k[1, 1], z])
    return e[:3, :3] @ cam + e[:3, 3:]


def colour_mask(rgb, colour):
    return np.all(rgb == np.array(tb.PALETTE[colour], dtype=np.uint8), axis=-1)


def estimate_target(rgb, depth, k, e, task):
    """Mean back-projected point of the pixels of the colour named in `task`: (3,)."""
    colour = task.removeprefix("touch the top of the ").removesuffix(" block")
    return back_project(depth, k, e, *np.nonzero(colour_mask(rgb, colour))).mean(axis=1)


def run_episode(env, seed, policy_fn):
    env.reset(seed=seed)
    while True:
        _, _, terminated, truncated, info = env.step(policy_fn())
        if terminated or truncated:
            return info["is_success"]


# --- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_blocks_have_their_colour_and_exact_metric_depth(seed):
    env = gym.make(tb.GYM_ID)
    obs, _ = env.reset(seed=seed)
    sim = env.unwrapped
    rgb, depth, k, e = obs["pixels"]["top"], obs["depth"], obs["intrinsics"], obs["extrinsics"]
    tops = sim.renderer.block_top_centres(sim.scene)
    ee_pixels = np.all(rgb == tb.END_EFFECTOR_RGB, axis=-1)
    # Without the end-effector nothing occludes the blocks, so their pixel sets are complete.
    blocks_rgb, blocks_depth = sim.renderer.render_blocks(sim.scene)
    block_px = 2 * tb.BLOCK_HALF_SIZE * k[0, 0] / sim.renderer.camera_height  # footprint side (pixels)

    for i, (colour, height) in enumerate(zip(sim.scene.colours, sim.scene.heights, strict=True)):
        # The top-centre projects onto a pixel of the block's colour (unless the gripper hides it).
        cam = e[:3, :3].T @ (tops[i] - e[:3, 3])
        u, v = (k @ (cam / cam[2]))[:2]
        if not ee_pixels[round(v), round(u)]:
            assert tuple(rgb[round(v), round(u)]) == tb.PALETTE[colour]
        # Depth of the top is camera_height - block height, exactly up to float32 rounding.
        mask = colour_mask(rgb, colour)
        assert mask.any()
        np.testing.assert_allclose(depth[0][mask], sim.renderer.camera_height - height, rtol=0, atol=1e-6)

        # Back-projecting the block's pixels recovers its top height and top-centre.
        mask = colour_mask(blocks_rgb, colour)
        assert (block_px - 1) ** 2 <= mask.sum() <= (block_px + 1) ** 2
        points = back_project(blocks_depth, k, e, *np.nonzero(mask))
        np.testing.assert_allclose(points[2], height, atol=1e-5)
        np.testing.assert_allclose(points[:2].mean(axis=1), tops[i, :2], atol=0.004)  # < 1 pixel

    # The target is the named block and the table is flat at depth camera_height.
    assert sim.task_description == f"touch the top of the {sim.scene.colours[sim.scene.target]} block"
    np.testing.assert_allclose(sim.target_position, tops[sim.scene.target])
    table = np.all(rgb == tb.TABLE_RGB, axis=-1)
    np.testing.assert_allclose(back_project(depth, k, e, *np.nonzero(table))[2], 0.0, atol=1e-5)


def test_end_effector_is_rendered_on_its_sphere():
    env = gym.make(tb.GYM_ID)
    obs, _ = env.reset(seed=3)
    rows, cols = np.nonzero(np.all(obs["pixels"]["top"] == tb.END_EFFECTOR_RGB, axis=-1))
    assert len(rows) > 0
    points = back_project(obs["depth"], obs["intrinsics"], obs["extrinsics"], rows, cols)
    distances = np.linalg.norm(points - obs["agent_pos"][:, None].astype(np.float64), axis=0)
    np.testing.assert_allclose(distances, tb.END_EFFECTOR_RADIUS, atol=1e-4)


def test_heights_change_depth_but_not_rgb():
    renderer = tb.TouchBlockRenderer(64, 64)
    scene = tb.sample_scene(np.random.default_rng(0), 3)
    taller = replace(scene, heights=scene.heights[::-1] + 0.03)
    ee = np.array([0.19, 0.19, 0.39])  # a corner, away from every block
    rgb_a, depth_a = renderer.render(scene, ee)
    rgb_b, depth_b = renderer.render(taller, ee)
    np.testing.assert_array_equal(rgb_a, rgb_b)
    assert not np.allclose(depth_a, depth_b)
    for colour, h_a, h_b in zip(scene.colours, scene.heights, taller.heights, strict=True):
        mask = colour_mask(rgb_a, colour)
        np.testing.assert_allclose(depth_a[0][mask] - depth_b[0][mask], h_b - h_a, atol=1e-6)


# --- task difficulty -----------------------------------------------------------------------------


def test_expert_succeeds_and_random_fails():
    env = gym.make(tb.GYM_ID)
    sim = env.unwrapped
    expert = lambda: tb.expert_action(sim.ee_position, sim.target_position, sim.max_step)  # noqa: E731
    expert_successes = sum(run_episode(env, seed, expert) for seed in range(40))
    rng = np.random.default_rng(0)
    uniform = lambda: rng.uniform(-1, 1, 3).astype(np.float32)  # noqa: E731
    random_successes = sum(run_episode(env, seed, uniform) for seed in range(100, 140))
    assert expert_successes >= 38
    assert random_successes <= 4


def test_success_needs_holding_at_the_top_so_depth_is_needed():
    env = gym.make(tb.GYM_ID)
    sim = env.unwrapped
    camera_height = sim.renderer.camera_height

    def geometric_policy(obs, flat_height=None):
        """Back-projects the named block's pixels; without depth, assumes a top at `flat_height`."""
        depth = obs["depth"].astype(np.float64)
        if flat_height is not None:
            depth = np.full_like(depth, camera_height - flat_height)
        k, e = obs["intrinsics"].astype(np.float64), obs["extrinsics"].astype(np.float64)
        target = estimate_target(obs["pixels"]["top"], depth, k, e, sim.task_description)
        return tb.expert_action(obs["agent_pos"].astype(np.float64), target, sim.max_step)

    def rate(policy):
        successes = 0
        for seed in range(40):
            obs, _ = env.reset(seed=seed)
            while True:
                obs, _, terminated, truncated, info = env.step(policy(obs))
                if terminated or truncated:
                    break
            successes += info["is_success"]
        return successes / 40

    assert rate(geometric_policy) >= 0.95
    mid_height = np.mean(tb.BLOCK_HEIGHT_RANGE)
    assert rate(lambda obs: geometric_policy(obs, flat_height=mid_height)) <= 0.5

    # Sliding through the target is not a success: only where the episode ends counts.
    env.reset(seed=0)
    sim.ee_position = sim.target_position + [0.0, 0.0, 0.05]
    distances, successes = [], []
    truncated = False
    while not truncated:
        _, _, terminated, truncated, info = env.step(np.array([0.0, 0.0, -1.0]))
        assert not terminated
        distances.append(info["distance"])
        successes.append(info["is_success"])
    assert min(distances) <= sim.success_radius and not any(successes)
    assert len(distances) == sim.episode_length


def test_holding_on_the_target_succeeds_only_at_the_last_step():
    env = gym.make(tb.GYM_ID, episode_length=5)
    sim = env.unwrapped
    env.reset(seed=3)
    sim.ee_position = sim.target_position.copy()
    results = [env.step(np.zeros(3, dtype=np.float32)) for _ in range(5)]
    assert [r[4]["at_target"] for r in results] == [True] * 5
    assert [r[4]["is_success"] for r in results] == [False] * 4 + [True]
    assert [r[3] for r in results] == [False] * 4 + [True]  # truncated at the horizon
    assert results[-1][1] == 1.0


# --- gymnasium / LeRobot integration ---------------------------------------------------------------


def test_gym_make_and_env_checker():
    env = gym.make(tb.GYM_ID)  # the passive env checker runs on reset/step
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    sim = env.unwrapped
    expected = float(np.linalg.norm(sim.ee_position - sim.target_position))
    offset = sim.ee_position - sim.target_position
    assert info == {
        "is_success": False,
        "distance": pytest.approx(expected),
        "at_target": False,
        "xy_error": pytest.approx(float(np.linalg.norm(offset[:2]))),
        "height_error": pytest.approx(float(offset[2])),
        "nearest_block_is_target": info["nearest_block_is_target"],  # checked in its own test
    }
    assert info["distance"] > sim.success_radius  # a reset starts away from the target
    assert env.spec.max_episode_steps == tb.DEFAULT_EPISODE_LENGTH
    check_env(gym.make(tb.GYM_ID, observation_height=24, observation_width=32).unwrapped)


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        tb.TouchBlockEnv(num_blocks=len(tb.PALETTE) + 1)
    with pytest.raises(ValueError, match="max_step"):
        tb.TouchBlockEnv(max_step=0.0)
    with pytest.raises(ValueError, match="image size"):
        tb.TouchBlockEnv(observation_height=4)
    with pytest.raises(ValueError, match="single task"):
        TouchBlockEnvConfig(task="Other-v0")
    env = tb.TouchBlockEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(2))


def test_env_config_is_registered_and_matches_dataset_features():
    assert EnvConfig.get_choice_class("touch_block") is TouchBlockEnvConfig
    cfg = TouchBlockEnvConfig(observation_height=24, observation_width=32)
    from_dataset = {
        k: v
        for k, v in dataset_to_policy_features(dataset_features(24, 32)).items()
        if not k.startswith("next.")
    }
    from_env = env_to_policy_features(cfg)
    assert from_env == from_dataset
    assert {k: v.shape for k, v in from_env.items() if k != "action"} == {
        k: shape(24, 32) for k, (shape, _) in CONTRACT.items()
    }


def test_make_env_and_env_processor_produce_the_policy_contract():
    cfg = TouchBlockEnvConfig(observation_height=24, observation_width=32)
    envs = make_env(cfg, n_envs=2)
    vec = envs["touch_block"][0]
    env_pre, env_post = make_env_pre_post_processors(cfg, policy_cfg=None)
    try:
        vec.reset(seed=[0, 1])
        obs, _, _, _, _ = vec.step(np.zeros((2, 3), dtype=np.float32))
        batch = preprocess_observation(obs)
        batch["task"] = list(vec.call("task_description"))
        batch = env_pre(batch)
    finally:
        vec.close()
    observation = {k: v for k, v in batch.items() if k.startswith("observation.")}
    assert set(observation) == set(CONTRACT)
    for key, (shape, dtype) in CONTRACT.items():
        assert observation[key].shape == (2, *shape(24, 32)), key
        assert observation[key].dtype == dtype, key
    images = observation["observation.images.top"]
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_allclose(observation["observation.depth.top"].numpy(), obs["depth"])
    np.testing.assert_allclose(observation["observation.state"].numpy(), obs["agent_pos"])
    assert len(batch["task"]) == 2 and all(t.startswith("touch the top of the ") for t in batch["task"])


def test_processor_step_batches_renames_and_describes_features():
    step = TouchBlockProcessorStep()
    out = step.observation(
        {
            "observation.depth": torch.ones(1, 8, 8, dtype=torch.float64),
            "observation.intrinsics": torch.eye(3),
            "observation.extrinsics": torch.eye(4),
            "observation.state": torch.zeros(1, 3),
        }
    )
    assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == {
        "observation.depth.top": ((1, 1, 8, 8), torch.float32),
        "observation.intrinsics.top": ((1, 3, 3), torch.float32),
        "observation.extrinsics.top": ((1, 4, 4), torch.float32),
        "observation.state": ((1, 3), torch.float32),
    }
    with pytest.raises(ValueError, match="observation.depth"):
        step.observation({"observation.depth": torch.ones(2, 2, 1, 8, 8)})
    features = {
        PipelineFeatureType.OBSERVATION: {"observation.depth": PolicyFeature(FeatureType.STATE, (1, 8, 8))}
    }
    renamed = step.transform_features(features)[PipelineFeatureType.OBSERVATION]
    assert list(renamed) == ["observation.depth.top"]


class GeometricOraclePolicy(nn.Module):
    """Solves the task from the policy inputs alone: colour mask + depth back-projection."""

    def reset(self):
        pass

    def select_action(self, batch):
        actions = []
        for i, task in enumerate(batch["task"]):
            rgb = (batch["observation.images.top"][i].permute(1, 2, 0) * 255).round().byte().numpy()
            depth, k, e = (
                batch[f"observation.{name}.top"][i].numpy().astype(np.float64)
                for name in ("depth", "intrinsics", "extrinsics")
            )
            state = batch["observation.state"][i].numpy().astype(np.float64)
            actions.append(tb.expert_action(state, estimate_target(rgb, depth, k, e, task), max_step=0.02))
        return torch.from_numpy(np.stack(actions))


def oracle_rollout(cfg: TouchBlockEnvConfig) -> dict:
    """LeRobot's own eval rollout of `GeometricOraclePolicy` in two envs of `cfg`, seeds 0 and 1."""
    vec = make_env(cfg, n_envs=2)["touch_block"][0]
    env_pre, env_post = cfg.get_env_processors()
    try:
        data = rollout(
            env=vec,
            policy=GeometricOraclePolicy(),
            env_preprocessor=env_pre,
            env_postprocessor=env_post,
            preprocessor=lambda batch: batch,
            postprocessor=lambda action: action,
            seeds=[0, 1],
        )
    finally:
        vec.close()
    return data


def test_lerobot_rollout_with_policy_using_only_the_contract():
    """LeRobot's own eval rollout: depth/intrinsics/extrinsics/task suffice to solve the task."""
    cfg = TouchBlockEnvConfig()
    data = oracle_rollout(cfg)
    assert data["success"].any(dim=1).all()
    assert data["action"].shape[-1] == 3


# --- instruction perturbation --------------------------------------------------------------------


def named_block(scene, instruction):
    """Index of the scene's block whose colour `instruction` names (ValueError if none)."""
    return scene.colours.index(instruction.removeprefix("touch the top of the ").removesuffix(" block"))


def assert_same_episode(env, reference):
    """Same scene, start and target block as the reference env after a reset with the same seed."""
    assert (env.scene.colours, env.scene.target) == (reference.scene.colours, reference.scene.target)
    np.testing.assert_array_equal(env.scene.footprint_centres, reference.scene.footprint_centres)
    np.testing.assert_array_equal(env.scene.heights, reference.scene.heights)
    np.testing.assert_array_equal(env.ee_position, reference.ee_position)


@pytest.mark.parametrize("seed", range(10))
def test_perturbed_instructions_name_what_they_say_in_the_same_episode(seed):
    reference = tb.TouchBlockEnv()
    reference.reset(seed=seed)
    original = reference.task_description
    instructions = {}
    for perturbation in PERTURBATIONS:
        env = tb.TouchBlockEnv(instruction_perturbation=perturbation)
        env.reset(seed=seed)
        assert_same_episode(env, reference)
        np.testing.assert_array_equal(env.target_position, reference.target_position)  # success: original
        instructions[perturbation] = env.task_description
    assert instructions["none"] == original
    assert instructions["empty"] == ""
    # Another colour present in the scene.
    assert named_block(reference.scene, instructions["other_task"]) != reference.scene.target
    assert instructions["shuffled"] != original
    assert Counter(instructions["shuffled"].split()) == Counter(original.split())


@pytest.mark.parametrize("success_target", ["original", "instruction"])
def test_success_is_judged_at_the_chosen_target(success_target):
    """The expert driven to either block: only the chosen success target's block succeeds."""
    env = tb.TouchBlockEnv(instruction_perturbation="other_task", success_target=success_target)
    for seed in range(4):
        outcomes = {}
        for goal in ("original", "instruction"):
            env.reset(seed=seed)
            block = env.scene.target if goal == "original" else named_block(env.scene, env.task_description)
            top = env.renderer.block_top_centres(env.scene)[block]
            truncated = False
            while not truncated:
                _, _, _, truncated, info = env.step(tb.expert_action(env.ee_position, top, env.max_step))
            outcomes[goal] = info["is_success"]
        assert outcomes == {
            "original": success_target == "original",
            "instruction": success_target == "instruction",
        }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"instruction_perturbation": "reversed"}, "instruction_perturbation must be one of"),
        ({"success_target": "nearest"}, "success_target must be one of"),
        ({"success_target": "instruction"}, "success_target='instruction' needs instruction_perturbation="),
        ({"success_target": "instruction", "instruction_perturbation": "shuffled"}, "needs instruction_pert"),
        ({"instruction_perturbation": "other_task", "num_blocks": 1}, "needs num_blocks >= 2"),
    ],
)
def test_meaningless_instruction_options_raise(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tb.TouchBlockEnv(**options)
    with pytest.raises(ValueError, match=re.escape(message)):
        TouchBlockEnvConfig(**options)


@dataclass
class EvalCommandLine:
    """The `--env.*` part of lerobot-eval's command line."""

    env: EnvConfig


def test_instruction_flags_reach_the_envs_lerobot_makes():
    default = TouchBlockEnvConfig()
    assert (default.gym_kwargs["instruction_perturbation"], default.gym_kwargs["success_target"]) == (
        "none",
        "original",
    )
    flags = [
        "--env.type=touch_block",
        "--env.instruction_perturbation=other_task",
        "--env.success_target=instruction",
    ]
    cfg = draccus.parse(config_class=EvalCommandLine, args=flags).env
    assert isinstance(cfg, TouchBlockEnvConfig)
    perturbed = make_env(cfg, n_envs=2)["touch_block"][0]
    reference = make_env(default, n_envs=2)["touch_block"][0]
    try:
        perturbed.reset(seed=[0, 1])
        reference.reset(seed=[0, 1])
        for env, ref, instruction, original in zip(
            perturbed.envs,
            reference.envs,
            perturbed.call("task_description"),
            reference.call("task_description"),
            strict=True,
        ):
            sim = env.unwrapped
            assert_same_episode(sim, ref.unwrapped)
            assert instruction != original
            assert sim.target_block == named_block(sim.scene, instruction) != sim.scene.target
    finally:
        perturbed.close()
        reference.close()


@pytest.mark.parametrize("success_target", ["original", "instruction"])
def test_lerobot_rollout_of_a_policy_that_follows_the_swapped_instruction(success_target):
    """A policy that does what it is told succeeds only when judged at the instruction's block."""
    cfg = TouchBlockEnvConfig(instruction_perturbation="other_task", success_target=success_target)
    data = oracle_rollout(cfg)
    assert data["success"].any(dim=1).tolist() == [success_target == "instruction"] * 2


# --- dataset -------------------------------------------------------------------------------------


def test_dataset_command_writes_a_loadable_offline_dataset(tmp_path):
    root = tmp_path / "touch_block"
    main(["--root", str(root), "--repo-id", "local/touch_block", "--episodes", "3", "--seed", "7",
          "--height", "24", "--width", "32"])  # fmt: skip

    dataset = LeRobotDataset("local/touch_block", root=root, depth_output_unit="m")
    assert dataset.num_episodes == 3 and dataset.fps == tb.FPS
    features = dataset.meta.features
    assert features["observation.images.top"]["dtype"] == "image"
    assert features["observation.images.top"]["names"] == ["height", "width", "channels"]
    assert tuple(features["observation.images.top"]["shape"]) == (24, 32, 3)
    # LeRobot's depth-map image, float32 metres stored losslessly.
    assert features["observation.depth.top"]["dtype"] == "image"
    assert tuple(features["observation.depth.top"]["shape"]) == (24, 32, 1)
    assert features["observation.depth.top"]["info"] == {"is_depth_map": True, "depth_unit": "m"}
    assert dataset.meta.depth_keys == ["observation.depth.top"]

    for index in range(len(dataset)):
        frame = dataset[index]
        for key, (shape, dtype) in CONTRACT.items():
            assert frame[key].shape == shape(24, 32), key
            assert frame[key].dtype == dtype, key
        assert frame["action"].shape == (3,) and frame["action"].abs().max() <= 1.0
        assert frame["task"].startswith("touch the top of the ")

    # Frame 0 of each episode is exactly the env's reset observation for seed `seed + episode`.
    env = gym.make(tb.GYM_ID, observation_height=24, observation_width=32)
    for episode in range(3):
        obs, _ = env.reset(seed=7 + episode)
        start = dataset.meta.episodes[episode]["dataset_from_index"]
        end = dataset.meta.episodes[episode]["dataset_to_index"]
        frame = dataset[start]
        assert frame["task"] == env.unwrapped.task_description
        assert {dataset[i]["task"] for i in range(start, end)} == {frame["task"]}
        image = (frame["observation.images.top"] * 255).round().byte().permute(1, 2, 0)
        np.testing.assert_array_equal(image.numpy(), obs["pixels"]["top"])
        np.testing.assert_array_equal(frame["observation.depth.top"].numpy(), obs["depth"])
        np.testing.assert_array_equal(frame["observation.state"].numpy(), obs["agent_pos"])
        # Each episode closes with the expert holding still on the target.
        for i in range(end - HOLD_FRAMES, end):
            assert dataset[i]["next.success"] and not dataset[i]["action"].any()

    stats = dataset.meta.stats
    for key in [*CONTRACT, "action"]:
        assert key in stats, key
    assert stats["observation.depth.top"]["mean"].shape == (1, 1, 1)
    assert 0.8 < stats["observation.depth.top"]["mean"].item() < 1.0
    # Camera matrices: the stats of all their entries as one channel (the camera never moves here).
    for key, matrix in (
        ("observation.intrinsics.top", obs["intrinsics"]),
        ("observation.extrinsics.top", obs["extrinsics"]),
    ):
        assert stats[key]["mean"].shape == (1, 1, 1), key
        np.testing.assert_allclose(
            [stats[key][name].item() for name in ("min", "max", "mean", "std")],
            [matrix.min(), matrix.max(), matrix.mean(), matrix.std()],
            rtol=1e-4,
            err_msg=key,
        )
    # LeRobot's default unit when loading is millimetres: frames and stats alike.
    in_mm = LeRobotDataset("local/touch_block", root=root)
    start = dataset.meta.episodes[0]["dataset_from_index"]
    torch.testing.assert_close(
        in_mm[start]["observation.depth.top"], dataset[start]["observation.depth.top"] * 1000.0
    )
    assert 800 < in_mm.meta.stats["observation.depth.top"]["mean"].item() < 1000


def test_dataset_command_takes_the_number_of_blocks(tmp_path):
    root = tmp_path / "one_block"
    main(["--root", str(root), "--episodes", "2", "--seed", "3", "--num-blocks", "1"])
    dataset = LeRobotDataset("local/touch_block", root=root, depth_output_unit="m")
    env = gym.make(tb.GYM_ID, num_blocks=1)
    for episode in range(2):
        obs, _ = env.reset(seed=3 + episode)
        assert len(env.unwrapped.scene.colours) == 1
        frame = dataset[dataset.meta.episodes[episode]["dataset_from_index"]]
        np.testing.assert_array_equal(frame["observation.depth.top"].numpy(), obs["depth"])


def test_expert_descends_while_it_corrects_and_is_continuous():
    """A policy imitating the expert must not learn to hover: the expert's action changes little when
    the end-effector moves a little, and it already descends when it is off in x/y."""
    target = np.array([0.05, -0.02, 0.06])
    off_in_xy = target + np.array([0.012, -0.008, 0.15])
    action = tb.expert_action(off_in_xy, target, max_step=0.02)
    assert action[2] < -0.5  # going down while still correcting x/y
    assert action[0] < 0 < action[1]  # and towards the target in x/y
    rng = np.random.default_rng(0)
    for _ in range(200):
        position = target + rng.uniform(-0.2, 0.2, 3)
        nudged = position + rng.normal(0.0, 1e-4, 3)
        step_change = np.abs(
            tb.expert_action(nudged, target, 0.02) - tb.expert_action(position, target, 0.02)
        )
        assert step_change.max() < 0.05  # 0.1 mm moves change no action component by more than 5 %
    np.testing.assert_array_equal(tb.expert_action(target, target, 0.02), np.zeros(3, np.float32))
    near = tb.expert_action(target + np.array([0.004, 0.0, 0.002]), target, 0.02)
    np.testing.assert_allclose(near, [-0.2, 0.0, -0.1], atol=1e-6)  # within a step: the exact offset


def test_reset_option_names_another_block_of_the_same_scene():
    env = gym.make(tb.GYM_ID, num_blocks=3, disable_env_checker=True).unwrapped
    drawn, _ = env.reset(seed=11)
    drawn_scene, drawn_start = env.scene, env.ee_position.copy()
    for block in range(3):
        obs, _ = env.reset(seed=11, options={"target_block": block})
        np.testing.assert_array_equal(obs["pixels"]["top"], drawn["pixels"]["top"])
        np.testing.assert_array_equal(env.ee_position, drawn_start)
        assert env.target_block == block == env.scene.target
        assert env.task_description == drawn_scene.instruction_for(block)
        np.testing.assert_array_equal(env.target_position, env.renderer.block_top_centres(drawn_scene)[block])
    with pytest.raises(ValueError, match="target_block"):
        env.reset(seed=11, options={"target_block": 3})


def test_dataset_records_every_block_of_a_scene_as_target(tmp_path):
    root = tmp_path / "every_block"
    main(
        [
            "--root",
            str(root),
            "--episodes",
            "4",
            "--seed",
            "5",
            "--num-blocks",
            "2",
            "--every-block-as-target",
        ]
    )
    dataset = LeRobotDataset("local/touch_block", root=root, depth_output_unit="m")
    env = gym.make(tb.GYM_ID, num_blocks=2, disable_env_checker=True).unwrapped
    for episode in range(4):
        env.reset(seed=5 + episode // 2, options={"target_block": episode % 2})
        start = dataset.meta.episodes[episode]["dataset_from_index"]
        end = dataset.meta.episodes[episode]["dataset_to_index"]
        assert dataset[start]["task"] == env.task_description
        # The last frame holds the end-effector on the block this episode's instruction names.
        np.testing.assert_allclose(
            dataset[end - 1]["observation.state"].numpy(), env.target_position, atol=1e-6
        )
    first_frames = [dataset[dataset.meta.episodes[e]["dataset_from_index"]] for e in (0, 1)]
    torch.testing.assert_close(*(f["observation.images.top"] for f in first_frames))  # same scene and start
    assert first_frames[0]["task"] != first_frames[1]["task"]
    assert not torch.equal(first_frames[0]["action"], first_frames[1]["action"])


def test_start_offset_option_starts_the_end_effector_near_the_target():
    env = gym.make(tb.GYM_ID, num_blocks=3, disable_env_checker=True).unwrapped
    inside = np.array([0.004, -0.006, -0.01])  # 1 cm below the top, within the footprint
    obs, _ = env.reset(seed=4, options={"target_block": 2, "start_offset": inside})
    assert env.target_block == 2
    np.testing.assert_allclose(obs["agent_pos"], env.target_position + inside, atol=1e-6)
    # Inside the block the end-effector is hidden: the view is that of the blocks alone.
    blocks_rgb, blocks_depth = env.renderer.render_blocks(env.scene)
    np.testing.assert_array_equal(obs["pixels"]["top"], blocks_rgb)
    np.testing.assert_array_equal(obs["depth"], blocks_depth)
    above, _ = env.reset(seed=4, options={"target_block": 2, "start_offset": [0.0, 0.0, 0.02]})
    assert (above["pixels"]["top"] == tb.END_EFFECTOR_RGB).all(-1).any()  # visible above the top
    far_below, _ = env.reset(seed=4, options={"start_offset": [0.0, 0.0, -1.0]})
    assert far_below["agent_pos"][2] == 0.0  # clipped to the workspace
    for bad in ([0.0, 0.0], [0.0, float("nan"), 0.0]):
        with pytest.raises(ValueError, match="start_offset"):
            env.reset(seed=4, options={"start_offset": bad})


def test_near_target_starts_record_the_way_back_from_above_and_inside_the_block(tmp_path):
    root = tmp_path / "near"
    main(["--root", str(root), "--episodes", "8", "--seed", "3", "--num-blocks", "1", "--height", "24",
          "--width", "32", "--near-target-starts", "0.5"])  # fmt: skip
    dataset = LeRobotDataset("local/touch_block", root=root, depth_output_unit="m")
    env = gym.make(tb.GYM_ID, num_blocks=1, disable_env_checker=True).unwrapped
    starts = {"near": 0, "drawn": 0}
    upward_from_inside = 0
    for episode in range(8):
        drawn, _ = env.reset(seed=3 + episode)
        target = env.target_position
        start = dataset.meta.episodes[episode]["dataset_from_index"]
        end = dataset.meta.episodes[episode]["dataset_to_index"]
        states = torch.stack([dataset[i]["observation.state"] for i in range(start, end)]).double().numpy()
        actions = torch.stack([dataset[i]["action"] for i in range(start, end)]).numpy()
        if np.array_equal(states[0], drawn["agent_pos"]):
            starts["drawn"] += 1
        else:
            starts["near"] += 1
            assert np.abs(states[0] - target).max() <= NEAR_TARGET_START_EXTENT + 1e-6
            upward_from_inside += int(states[0][2] < target[2] and actions[0][2] > 0)
        # Every frame is the noise-free expert's: its action for the state it shows, executed exactly.
        for state, action in zip(states, actions, strict=True):
            np.testing.assert_allclose(action, tb.expert_action(state, target, env.max_step), atol=1e-5)
        np.testing.assert_allclose(np.diff(states, axis=0), actions[:-1] * env.max_step, atol=1e-5)
        for i in range(end - HOLD_FRAMES, end):  # and each episode closes holding still on the target
            assert dataset[i]["next.success"] and not dataset[i]["action"].any()
    assert starts["near"] > 0 and starts["drawn"] > 0
    assert upward_from_inside > 0


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_near_target_starts_must_be_a_fraction(tmp_path, fraction):
    with pytest.raises(ValueError, match="near_target_starts"):
        make_touch_block_dataset(tmp_path / "bad", "local/touch_block", 1, 0, near_target_starts=fraction)


# --- where episodes end (touch_block_outcomes) ---------------------------------------------------


def test_step_info_says_where_the_end_effector_is_relative_to_the_blocks():
    env = gym.make(tb.GYM_ID, num_blocks=3, disable_env_checker=True).unwrapped
    env.reset(seed=4)
    tops = env.renderer.block_top_centres(env.scene)
    other = next(block for block in range(3) if block != env.target_block)
    for block, offset in ((env.target_block, [0.003, -0.004, -0.012]), (other, [0.0, 0.0, 0.05])):
        env.ee_position = tops[block] + np.array(offset)
        _, _, _, _, info = env.step(np.zeros(3, np.float32))
        at_named = block == env.target_block
        assert info["nearest_block_is_target"] == at_named
        expected = env.ee_position - tops[env.target_block]
        assert info["xy_error"] == pytest.approx(np.linalg.norm(expected[:2]))
        assert info["height_error"] == pytest.approx(expected[2])
        assert info["at_target"] == at_named  # 1.3 cm off in 3D: within the 1.5 cm radius


def test_outcome_summary_counts_and_medians():
    infos = [
        {"is_success": True, "xy_error": 0.005, "height_error": -0.002, "nearest_block_is_target": True},
        {"is_success": False, "xy_error": 0.01, "height_error": -0.03, "nearest_block_is_target": True},
        {"is_success": False, "xy_error": 0.2, "height_error": 0.01, "nearest_block_is_target": False},
        {"is_success": False, "xy_error": 0.02, "height_error": 0.0, "nearest_block_is_target": True},
    ]
    summary = OutcomeSummary.of(infos, success_radius=0.015)
    assert summary.episodes == 4 and summary.success_pc == 25.0
    assert summary.ended_nearest_the_target_pc == 75.0
    assert summary.xy_within_radius_pc == 50.0 and summary.height_within_radius_pc == 75.0
    assert summary.median_xy_error_cm == pytest.approx(1.5)
    assert summary.median_abs_height_error_cm == pytest.approx(0.6)
    assert summary.median_height_error_cm == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="xy_error"):
        OutcomeSummary.of([{"is_success": True}], success_radius=0.015)


@pytest.mark.parametrize("success_target", ["original", "instruction"])
def test_outcomes_tell_which_block_a_policy_went_to(success_target):
    """The oracle follows whatever instruction it gets: with the instruction swapped it ends at the
    newly named block, which the outcomes report as the target only when success is judged there."""
    cfg = TouchBlockEnvConfig(instruction_perturbation="other_task", success_target=success_target)
    vec = make_env(cfg, n_envs=3)["touch_block"][0]
    env_pre, env_post = cfg.get_env_processors()
    try:
        finals = run_until_each_ends(
            vec, [0, 1, 2], GeometricOraclePolicy(), (env_pre, lambda b: b, lambda a: a, env_post)
        )
    finally:
        vec.close()
    summary = OutcomeSummary.of(finals, success_radius=cfg.success_radius)
    followed = success_target == "instruction"
    assert summary.episodes == 3
    assert summary.ended_nearest_the_target_pc == summary.success_pc == (100.0 if followed else 0.0)
    if followed:
        assert summary.median_xy_error_cm < 0.5 and summary.median_abs_height_error_cm < 0.5


# --- robustness: a moved camera and sensor-like depth ------------------------------------------------


def _top_centre_pixel_point(obs, top):
    """World point back-projected (backproject_depth) at the pixel where `top` (3,) projects; None
    when that is outside the image."""
    from lerobot_llava3d_fusion.geometry.patch_points import backproject_depth

    k, e = obs["intrinsics"].astype(np.float64), obs["extrinsics"].astype(np.float64)
    camera = e[:3, :3].T @ (top - e[:3, 3])
    u, v = (k @ (camera / camera[2]))[:2]
    points, valid = backproject_depth(
        torch.from_numpy(obs["depth"][None]), torch.from_numpy(obs["intrinsics"]), torch.from_numpy(obs["extrinsics"])
    )
    row, col = round(v), round(u)
    if not (0 <= row < obs["depth"].shape[1] and 0 <= col < obs["depth"].shape[2]):
        return None
    assert valid[0, row, col]
    return points[0, row, col].double().numpy()


@pytest.mark.parametrize("seed", range(4))
def test_moved_camera_sees_the_same_block_tops_in_the_world(seed):
    nominal = tb.TouchBlockEnv(num_blocks=3)
    moved = tb.TouchBlockEnv(num_blocks=3, camera_translation_perturbation=0.05, camera_rotation_perturbation=5.0)
    nominal_obs, _ = nominal.reset(seed=seed)
    moved_obs, _ = moved.reset(seed=seed)
    # Same scene, start and instruction; another camera pose, reported exactly.
    np.testing.assert_array_equal(nominal.scene.footprint_centres, moved.scene.footprint_centres)
    np.testing.assert_array_equal(nominal_obs["agent_pos"], moved_obs["agent_pos"])
    assert nominal.task_description == moved.task_description
    assert not np.allclose(moved_obs["extrinsics"], nominal_obs["extrinsics"])
    np.testing.assert_allclose(moved_obs["extrinsics"], moved.renderer.camera_pose.extrinsics, atol=1e-6)
    rotation = moved_obs["extrinsics"][:3, :3].astype(np.float64)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)

    compared = 0
    for top in moved.renderer.block_top_centres(moved.scene):
        points = [_top_centre_pixel_point(obs, top) for obs in (nominal_obs, moved_obs)]
        if any(point is None or abs(point[2] - top[2]) > 0.005 for point in points):
            continue  # out of the moved view, or the end-effector hides this top in one of the views
        # The pixel nearest the top-centre: the same world point up to the pixel's footprint on the top
        # (~2.5 mm at 64 x 64), whichever camera measured it; its height is exact.
        np.testing.assert_allclose(points[0], points[1], atol=0.004)
        np.testing.assert_allclose(points[1], top, atol=0.004)
        np.testing.assert_allclose(points[1][2], top[2], atol=1e-4)
        compared += 1
    assert compared >= 1


def test_moved_camera_shows_block_walls_and_keeps_exact_table_depth():
    env = tb.TouchBlockEnv(num_blocks=3, camera_translation_perturbation=0.1, camera_rotation_perturbation=10.0)
    obs, _ = env.reset(seed=0)
    k, e = obs["intrinsics"], obs["extrinsics"]
    table = np.all(obs["pixels"]["top"] == tb.TABLE_RGB, axis=-1)
    # Every table pixel back-projects onto the table plane, whatever the pose.
    np.testing.assert_allclose(back_project(obs["depth"], k, e, *np.nonzero(table))[2], 0.0, atol=1e-5)
    # Block pixels lie on or inside their block: between the table and the block's top.
    blocks_rgb, blocks_depth = env.renderer.render_blocks(env.scene)
    for colour, height in zip(env.scene.colours, env.scene.heights, strict=True):
        z = back_project(blocks_depth, k, e, *np.nonzero(colour_mask(blocks_rgb, colour)))[2]
        assert z.size > 0 and z.min() > -1e-5 and z.max() < height + 1e-5
    # A moved camera sees some walls: block pixels below the top.
    all_blocks = ~np.all(blocks_rgb == tb.TABLE_RGB, axis=-1)
    z = back_project(blocks_depth, k, e, *np.nonzero(all_blocks))[2]
    assert (z < env.scene.heights.min() - 0.005).any()


def test_camera_draws_follow_the_reset_seed_and_zero_keeps_the_nominal_camera():
    env = tb.TouchBlockEnv(camera_translation_perturbation=0.02, camera_rotation_perturbation=2.0)
    poses = [env.reset(seed=seed)[0]["extrinsics"] for seed in (1, 1, 2)]
    np.testing.assert_array_equal(poses[0], poses[1])
    assert not np.array_equal(poses[0], poses[2])
    offset = poses[0][:3, 3] - np.array([0.0, 0.0, tb.CAMERA_HEIGHT])
    assert np.abs(offset).max() <= 0.02
    straight_down = np.diag([1.0, -1.0, -1.0, 1.0])
    straight_down[2, 3] = tb.CAMERA_HEIGHT
    np.testing.assert_array_equal(tb.TouchBlockEnv().reset(seed=1)[0]["extrinsics"], straight_down)


def test_sensor_depth_noise_in_the_env_and_bad_robustness_options():
    exact = tb.TouchBlockEnv().reset(seed=0)[0]
    env = tb.TouchBlockEnv(depth_noise="sensor")
    noisy = env.reset(seed=0)[0]
    np.testing.assert_array_equal(noisy["pixels"]["top"], exact["pixels"]["top"])
    valid = noisy["depth"] > 0
    assert 0.9 < valid.mean() < 1.0  # a few holes
    assert 0 < np.abs(noisy["depth"][valid] - exact["depth"][valid]).max() < 0.02
    assert not np.array_equal(env.step(np.zeros(3))[0]["depth"], noisy["depth"])  # fresh noise per frame
    check_env(env, skip_render_check=True)
    for options, field in [
        ({"camera_translation_perturbation": -0.01}, "camera_translation_perturbation"),
        ({"camera_translation_perturbation": 0.7}, "camera_translation_perturbation"),
        ({"camera_rotation_perturbation": 45.0}, "camera_rotation_perturbation"),
        ({"depth_noise": "kinect"}, "depth_noise"),
    ]:
        with pytest.raises(ValueError, match=field):
            tb.TouchBlockEnv(**options)
        with pytest.raises(ValueError, match=field):
            TouchBlockEnvConfig(**options)


def test_robustness_flags_reach_the_envs_lerobot_makes():
    flags = [
        "--env.type=touch_block",
        "--env.camera_translation_perturbation=0.05",
        "--env.camera_rotation_perturbation=5",
        "--env.depth_noise=sensor",
    ]
    cfg = draccus.parse(config_class=EvalCommandLine, args=flags).env
    envs = make_env(cfg, n_envs=1, use_async_envs=False)
    vec_env = next(iter(next(iter(envs.values())).values()))
    try:
        sub_env = vec_env.envs[0].unwrapped
        assert (sub_env.camera_translation_perturbation, sub_env.camera_rotation_perturbation) == (0.05, 5.0)
        assert sub_env.depth_noise == "sensor"
        observation, _ = vec_env.reset(seed=[3])
        np.testing.assert_allclose(
            observation["extrinsics"][0], sub_env.renderer.camera_pose.extrinsics, atol=1e-6
        )
    finally:
        vec_env.close()


def test_dataset_with_moved_cameras_records_each_episodes_view(tmp_path):
    options = {"camera_translation_perturbation": 0.05, "camera_rotation_perturbation": 5.0}
    make_touch_block_dataset(root=tmp_path / "ds", repo_id="local/tb", num_episodes=2, seed=0, num_blocks=1, **options)
    dataset = LeRobotDataset("local/tb", root=tmp_path / "ds")
    first_frames = [dataset[int(i)] for i in dataset.meta.episodes["dataset_from_index"]]
    for seed, frame in enumerate(first_frames):
        expected = tb.TouchBlockEnv(num_blocks=1, **options).reset(seed=seed)[0]["extrinsics"]
        np.testing.assert_allclose(frame["observation.extrinsics.top"].numpy(), expected, atol=1e-6)
    assert not torch.equal(first_frames[0]["observation.extrinsics.top"], first_frames[1]["observation.extrinsics.top"])
