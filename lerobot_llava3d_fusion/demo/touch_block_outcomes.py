"""Where a policy's touch_block episodes end: at the named block or another one, and how far off.

`lerobot-eval` reports success only, and a touch_block episode fails in two ways that need different
fixes: the policy goes to another block than the instruction names (it did not read the colour), or
it goes to the named block and stops next to its top (imprecision in x/y or in height). This module
runs a checkpoint on touch_block episodes as `lerobot-eval` does (LeRobot's env factory, processors
and `select_action`, the same seeds) and summarises the env's last-step `info` of every episode:

    python -m lerobot_llava3d_fusion.demo.touch_block_outcomes --policy-path CKPT --num-blocks 3 \
        --episodes 50 [--seed 1000] [--env-option instruction_perturbation=other_task ...] \
        [--output-json outcomes.json]

With `--env-option success_target=instruction` the "target" is the block the (swapped) instruction
names, so "ended nearest the target" then measures how often the policy follows the new colour.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from lerobot.envs.utils import preprocess_observation
from lerobot.utils.constants import ACTION
from tqdm import tqdm

logger = logging.getLogger(__name__)

# The touch_block `info` entries an outcome is computed from (see `TouchBlockEnv`).
OUTCOME_INFO_KEYS = ("is_success", "xy_error", "height_error", "nearest_block_is_target")


@dataclass(frozen=True)
class OutcomeSummary:
    """Where `episodes` episodes ended (percentages of episodes, errors in cm)."""

    episodes: int
    success_pc: float
    ended_nearest_the_target_pc: float  # the target's top-centre is the nearest block in x/y
    xy_within_radius_pc: float  # horizontal error within the success radius
    height_within_radius_pc: float  # |height error| within the success radius
    median_xy_error_cm: float
    median_abs_height_error_cm: float
    median_height_error_cm: float  # signed: negative = below the top

    @classmethod
    def of(cls, final_infos: list[dict], success_radius: float) -> OutcomeSummary:
        """Summary of episodes' last-step `info` dicts (the `OUTCOME_INFO_KEYS` of each)."""
        if not final_infos:
            raise ValueError("no episodes to summarise")
        missing = set(OUTCOME_INFO_KEYS) - set(final_infos[0])
        if missing:
            raise ValueError(f"final infos lack {sorted(missing)}: not from a touch_block env?")
        values = {
            key: np.array([info[key] for info in final_infos], dtype=float) for key in OUTCOME_INFO_KEYS
        }

        def percent(mask: np.ndarray) -> float:
            return round(100.0 * float(np.mean(mask)), 1)

        def cm(value: float) -> float:
            return round(100.0 * float(value), 2)

        return cls(
            episodes=len(final_infos),
            success_pc=percent(values["is_success"] > 0),
            ended_nearest_the_target_pc=percent(values["nearest_block_is_target"] > 0),
            xy_within_radius_pc=percent(values["xy_error"] <= success_radius),
            height_within_radius_pc=percent(np.abs(values["height_error"]) <= success_radius),
            median_xy_error_cm=cm(np.median(values["xy_error"])),
            median_abs_height_error_cm=cm(np.median(np.abs(values["height_error"]))),
            median_height_error_cm=cm(np.median(values["height_error"])),
        )


def final_infos_of_step(info: dict, num_envs: int) -> list[dict | None]:
    """Per sub-env, the last-step info of an episode that ended at this vector-env step, else None.

    LeRobot's vector envs reset a finished sub-env in the same step (`AutoresetMode.SAME_STEP`) and
    hand its last info on as `info["final_info"]`, with the mask `info["_final_info"]`."""
    if "final_info" not in info:
        return [None] * num_envs
    final, ended = info["final_info"], info["_final_info"]
    return [{key: final[key][i] for key in OUTCOME_INFO_KEYS} if ended[i] else None for i in range(num_envs)]


def touch_block_outcomes(
    policy_path: Path,
    episodes: int,
    start_seed: int = 1000,
    batch_size: int = 10,
    device: str = "cpu",
    **env_options,
) -> OutcomeSummary:
    """Run the checkpoint at `policy_path` on `episodes` touch_block episodes (seeds `start_seed`,
    `start_seed + 1`, ... as lerobot-eval numbers them) and summarise where they ended.
    `env_options` are `TouchBlockEnvConfig` fields (`num_blocks`, `instruction_perturbation`, ...)."""
    from lerobot.envs.factory import make_env, make_env_config

    if episodes < 1 or batch_size < 1:
        raise ValueError(f"episodes and batch_size must be positive, got {episodes} and {batch_size}")
    env_config = make_env_config("touch_block", **env_options)
    policy, pipeline = load_policy_as_lerobot_eval_does(policy_path, env_config, device)
    final_infos: list[dict] = []
    with tqdm(total=episodes, desc="touch_block episodes", unit="ep") as progress:
        for batch_start in range(start_seed, start_seed + episodes, batch_size):
            seeds = list(range(batch_start, min(batch_start + batch_size, start_seed + episodes)))
            envs = make_env(env_config, n_envs=len(seeds), use_async_envs=False)
            vec_env = next(iter(next(iter(envs.values())).values()))  # {suite: {task_id: env}}
            try:
                final_infos.extend(
                    run_until_each_ends(
                        vec_env,
                        seeds,
                        policy,
                        pipeline=pipeline,
                    )
                )
            finally:
                vec_env.close()
            progress.update(len(seeds))
    return OutcomeSummary.of(final_infos, success_radius=env_config.success_radius)


def load_policy_as_lerobot_eval_does(policy_path: Path, env_config, device: str) -> tuple:
    """The checkpoint's policy (eval mode) and its (env preprocessor, policy preprocessor, policy
    postprocessor, env postprocessor), built by LeRobot's factories as `lerobot-eval` builds them."""
    from lerobot.configs import PreTrainedConfig
    from lerobot.envs.factory import make_env_pre_post_processors
    from lerobot.policies import make_policy, make_pre_post_processors

    policy_config = PreTrainedConfig.from_pretrained(policy_path)
    policy_config.pretrained_path = Path(policy_path)
    policy_config.device = device
    policy = make_policy(cfg=policy_config, env_cfg=env_config)
    policy.eval()
    preprocessor, postprocessor = make_pre_post_processors(
        policy_cfg=policy_config,
        pretrained_path=policy_config.pretrained_path,
        preprocessor_overrides={"device_processor": {"device": device}},
    )
    env_preprocessor, env_postprocessor = make_env_pre_post_processors(
        env_cfg=env_config, policy_cfg=policy_config
    )
    return policy, (env_preprocessor, preprocessor, postprocessor, env_postprocessor)


@dataclass(frozen=True)
class EpisodeTrace:
    """One episode seen from the side: the end-effector's height and x/y distance to the named block's
    top-centre at every step (index 0: after reset), in metres."""

    label: str
    target_top_z: float  # height of the named block's top
    ee_z: list[float]
    xy_error: list[float]
    success: bool

    @classmethod
    def of(cls, label: str, start_ee_z: float, infos: list[dict]) -> EpisodeTrace:
        """From the env's `info` after reset and after every step (`height_error`, `xy_error`,
        `is_success`); `start_ee_z`: the end-effector's height after reset."""
        top_z = float(start_ee_z) - float(infos[0]["height_error"])
        return cls(
            label=label,
            target_top_z=top_z,
            ee_z=[top_z + float(info["height_error"]) for info in infos],
            xy_error=[float(info["xy_error"]) for info in infos],
            success=bool(infos[-1]["is_success"]),
        )


def policy_episode_trace(
    policy_path: Path, seed: int, label: str, device: str = "cpu", **env_options
) -> EpisodeTrace:
    """One touch_block episode (seed `seed`, as lerobot-eval numbers them) of the checkpoint at
    `policy_path`, run as `lerobot-eval` runs it, step by step. `env_options`: as `touch_block_outcomes`."""
    from lerobot.envs.factory import make_env, make_env_config

    env_config = make_env_config("touch_block", **env_options)
    policy, pipeline = load_policy_as_lerobot_eval_does(policy_path, env_config, device)
    envs = make_env(env_config, n_envs=1, use_async_envs=False)
    vec_env = next(iter(next(iter(envs.values())).values()))  # {suite: {task_id: env}}
    try:
        observation, info = vec_env.reset(seed=[seed])
        start_ee_z = float(observation["agent_pos"][0, 2])
        infos = [{key: info[key][0] for key in OUTCOME_INFO_KEYS}]
        policy.reset()
        while True:
            observation, info = step_policy(vec_env, observation, policy, pipeline)
            final = final_infos_of_step(info, 1)[0]
            # The sub-env resets in the step its episode ends: its last info is the final one.
            infos.append(final if final is not None else {key: info[key][0] for key in OUTCOME_INFO_KEYS})
            if final is not None:
                return EpisodeTrace.of(label, start_ee_z, infos)
    finally:
        vec_env.close()


def step_policy(vec_env, observation: dict, policy, pipeline: tuple) -> tuple[dict, dict]:
    """One step of `vec_env` with the policy's action, through the pipelines as lerobot-eval's rollout
    does; -> (next observation, info). `pipeline`: (env preprocessor, policy preprocessor, policy
    postprocessor, env postprocessor)."""
    env_preprocessor, preprocessor, postprocessor, env_postprocessor = pipeline
    batch = preprocess_observation(observation)
    batch["task"] = list(vec_env.call("task_description"))
    batch = preprocessor(env_preprocessor(batch))
    with torch.inference_mode():
        action = policy.select_action(batch)
    action = env_postprocessor({ACTION: postprocessor(action)})[ACTION]
    observation, _, _, _, info = vec_env.step(action.cpu().numpy())
    return observation, info


def run_until_each_ends(vec_env, seeds: list[int], policy, pipeline: tuple) -> list[dict]:
    """Reset `vec_env` with `seeds`, act with `policy.select_action` as lerobot-eval's rollout does,
    and return each sub-env's last-step info of its first episode, in seed order.

    `pipeline`: (env preprocessor, policy preprocessor, policy postprocessor, env postprocessor)."""
    observation, _ = vec_env.reset(seed=seeds)
    policy.reset()
    finals: list[dict | None] = [None] * len(seeds)
    while any(final is None for final in finals):
        observation, info = step_policy(vec_env, observation, policy, pipeline)
        for index, final in enumerate(final_infos_of_step(info, len(seeds))):
            if final is not None and finals[index] is None:
                finals[index] = final
    return finals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy-path", type=Path, required=True, help="a saved pretrained_model folder")
    parser.add_argument("--num-blocks", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first episode (lerobot-eval's)")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--output-json", type=Path, help="also write the summary to this file")
    parser.add_argument(
        "--env-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a touch_block env option, as --env.NAME=VALUE in lerobot-eval (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    env_options = {}
    for option in args.env_option:
        name, separator, value = option.partition("=")
        if not separator:
            parser.error(f"--env-option takes NAME=VALUE, got {option!r}")
        try:  # numbers and booleans as JSON, everything else as the string itself
            env_options[name] = json.loads(value)
        except json.JSONDecodeError:
            env_options[name] = value
    summary = touch_block_outcomes(
        args.policy_path,
        args.episodes,
        start_seed=args.seed,
        batch_size=args.batch_size,
        num_blocks=args.num_blocks,
        **env_options,
    )
    text = json.dumps(asdict(summary), indent=2)
    logger.info("%s", text)
    if args.output_json is not None:
        args.output_json.write_text(text)


if __name__ == "__main__":
    main()
