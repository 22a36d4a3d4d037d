"""The closed-loop demo, end to end through LeRobot's own scripts (`make demo`).

1. write a LeRobotDataset of scripted-expert touch_block episodes (RGB, depth, camera matrices);
2. train llava3d_fusion on it with `lerobot-train` (the shipped preset `touch_block_demo`,
   `llava3d-fusion-preset touch_block_demo`);
3. evaluate the checkpoint in closed loop with `lerobot-eval --env.type=touch_block`;
4. with several blocks per scene, evaluate it twice more with the instruction swapped for another
   block's (`--env.instruction_perturbation=other_task`), success judged at the original block
   (`--env.success_target=original`) and at the newly named one (`--env.success_target=instruction`):
   a policy that follows its instruction scores high on the second and low on the first;
5. print its success rates next to scripted references on the same seeds: the expert, the expert
   without depth (it assumes mid-range heights), the expert without language (it picks a block at
   random) and uniform random actions.

`--geometry depth none` trains and evaluates one policy per geometry setting, to show what depth
adds. Scenes hold `--num-blocks` blocks (default 1: vision and depth decide success; with more the
instruction's colour picks the block, and by default each scene is recorded once per block,
`--every-block-as-target`, the episodes starting near the target come on top of those, and the policy
trains more steps, leaving each episode's last frames out of its samples). `--outcomes` adds where each evaluation's
episodes ended (`envs/touch_block_outcomes.py`).
Everything runs offline on the CPU; results go to
`<workdir>/<blocks>_blocks_<episodes>_episodes_<steps>_steps/results.json`, next to two figures
(`demo/touch_block_figures.py`): `success.png`, the success of every policy and reference, and
`side_view.png`, one episode seen from the side (the end-effector's height against the named block's
top, and its x/y distance), for the expert with and without depth and each trained policy. A run with
the same settings reuses the dataset and checkpoints it finds there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import gymnasium as gym
import numpy as np
from tqdm import tqdm

from lerobot_llava3d_fusion.backbones.loading import build_tiny_llava, build_word_tokenizer
from lerobot_llava3d_fusion.demo.make_touch_block_dataset import make_touch_block_dataset
from lerobot_llava3d_fusion.demo.touch_block_captions import caption_vocabulary, touch_block_image_text_pairs
from lerobot_llava3d_fusion.demo.touch_block_figures import write_demo_figures
from lerobot_llava3d_fusion.demo.touch_block_outcomes import (
    EpisodeTrace,
    policy_episode_trace,
    touch_block_outcomes,
)
from lerobot_llava3d_fusion.demo.vlm_pretraining import pretrain_vlm
from lerobot_llava3d_fusion.envs import touch_block
from lerobot_llava3d_fusion.envs.configs import TouchBlockEnvConfig
from lerobot_llava3d_fusion.presets import preset_path

logger = logging.getLogger(__name__)

PRESET = preset_path("touch_block_demo")
PRESET_CONFIG = json.loads(PRESET.read_text())
PRESET_BATCH_SIZE = PRESET_CONFIG["batch_size"]
VLM_PRETRAINING_LR = 1e-3
EVAL_START_SEED = 1000  # lerobot-eval's default seed; the dataset uses seeds 0 .. episodes - 1
# `--seed S` moves every seed of a run by S: the scenes of the training set start at S * SEED_STRIDE
# and the evaluation episodes at EVAL_START_SEED + S * SEED_STRIDE (the two ranges never meet: a
# training set has fewer than 1,000 scenes), and lerobot-train's seed (weight initialisation, batch
# order, flow-matching noise) is the preset's plus S. S = 0 is the run the README reports.
SEED_STRIDE = 100_000
# Defaults of the command line: scenes in the training set, training steps with one block per scene
# and with several (where the colour word must be learnt too).
DEFAULT_SCENES = 500
DEFAULT_STEPS_ONE_BLOCK = 4800
DEFAULT_STEPS_SEVERAL_BLOCKS = 5600
# Fraction of the recorded episodes that start near the target's top (above or inside the block), so
# the data shows the way back to it (make_touch_block_dataset). With one block per scene they replace
# some of the episodes that start above the blocks; with several they come on top of them (the
# default number of episodes grows), since those episodes are where the colour word is learnt (README).
DEFAULT_NEAR_TARGET_STARTS = 0.25
# Frames at the end of every episode left out of the training samples (--policy.drop_n_last_frames)
# with several blocks per scene: there the end-effector is at its block and needs no colour word, and
# leaving them out shortens the loss plateau before the colour word is learnt (docs/demo.md). Their
# actions still train inside the chunks of the frames before them.
DEFAULT_DROP_N_LAST_FRAMES_SEVERAL_BLOCKS = 6


def dataset_seed(seed: int) -> int:
    """Env seed of the first scene of the training set of demo seed `seed`."""
    return seed * SEED_STRIDE


def eval_start_seed(seed: int) -> int:
    """Env seed of the first evaluation episode of demo seed `seed` (lerobot-eval's `--seed`)."""
    return EVAL_START_SEED + seed * SEED_STRIDE


def training_seed(seed: int) -> int:
    """lerobot-train's `--seed` for demo seed `seed`."""
    return PRESET_CONFIG["seed"] + seed


def demo_vocabulary() -> list[str]:
    """Every word of every touch_block instruction and image-text pair (`touch_block_captions`)."""
    return caption_vocabulary()


def write_demo_backbone(directory: Path) -> Path:
    """A small random LLaVA checkpoint laid out like a real one (config, weights, tokenizer, image
    processor), sized for the demo: 64 px images in 8 px patches (an 8 x 8 grid, fine enough to
    localise a 5 cm block), a 4-layer Qwen2 LLM of width 128 and a word-level tokenizer over the
    task's words (one token per word, as a real tokenizer makes of common words, so an instruction
    is 7 tokens rather than 30 bytes)."""
    if (directory / "config.json").exists():
        return directory
    from transformers import SiglipImageProcessor

    model, tokenizer = build_tiny_llava(
        image_size=64,
        patch_size=8,
        vision_hidden_size=64,
        text_sizes={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
        },
        tokenizer=build_word_tokenizer(demo_vocabulary()),
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


def training_environment(num_workers: int, cpu_count: int | None = None) -> dict[str, str]:
    """Environment of the `lerobot-train` process: torch's compute threads (`OMP_NUM_THREADS`) are
    the cores its `num_workers` DataLoader workers leave free, at least one, unless the caller set
    `OMP_NUM_THREADS` already. Decoding a sample's images takes a worker about as long as the model's
    step takes one core, so on a small CPU machine compute threads that compete with the workers for
    the same cores slow every step (2 cores, 2 workers: 0.47 s per step with one thread against 0.87 s
    with two)."""
    environment = dict(os.environ)
    if "OMP_NUM_THREADS" not in environment:
        free_cores = (cpu_count or os.cpu_count() or 1) - num_workers
        environment["OMP_NUM_THREADS"] = str(max(1, free_cores))
    return environment


def run_lerobot(
    script: str, args: list[str], log_path: Path, environment: dict[str, str] | None = None
) -> None:
    """Run one of LeRobot's unmodified command-line scripts, its output teed to `log_path`."""
    command = [sys.executable, "-m", f"lerobot.scripts.{script}", *args]
    logger.info("$ %s", " ".join(command))
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        for line in process.stdout:
            log.write(line)
            if "step:" in line or "Aggregated" in line or "Error" in line:
                sys.stderr.write(line)
        if process.wait() != 0:
            raise RuntimeError(f"{script} failed (exit {process.returncode}); see {log_path}")


def train(
    workdir: Path,
    dataset_root: Path,
    backbone: Path,
    geometry: str,
    steps: int,
    pretrained_backbone: bool,
    batch_size: int | None = None,
    policy_options: dict[str, str] | None = None,
    name: str | None = None,
    seed: int = 0,
    save_freq: int | None = None,
) -> Path:
    """The checkpoint of `lerobot-train` with the demo's preset into `<workdir>/train_<name>` (`name`
    defaults to the geometry); `policy_options` add `--policy.<option>=<value>` arguments; `seed` is
    the demo seed (`training_seed`); `save_freq` also keeps a checkpoint every that many steps (saving
    draws no random numbers: the run is the same)."""
    name = name or geometry
    output_dir = workdir / f"train_{name}"
    checkpoint = output_dir / "checkpoints" / "last" / "pretrained_model"
    if checkpoint.exists():
        logger.info("Reusing %s", checkpoint)
        return checkpoint
    run_lerobot(
        "lerobot_train",
        [
            f"--config_path={PRESET}",
            f"--dataset.root={dataset_root}",
            f"--policy.vlm_model_name={backbone.resolve()}",
            f"--policy.load_vlm_weights={str(pretrained_backbone).lower()}",
            f"--policy.geometry={geometry}",
            *(["--policy.geometry_origin=world"] if geometry == "none" else []),  # no 3D points to move
            *(f"--policy.{option}={value}" for option, value in (policy_options or {}).items()),
            f"--steps={steps}",
            *([f"--batch_size={batch_size}"] if batch_size is not None else []),  # else the preset's
            f"--policy.scheduler_decay_steps={steps}",  # the cosine decay spans the whole run
            f"--save_freq={save_freq or steps}",
            f"--seed={training_seed(seed)}",
            f"--output_dir={output_dir}",
        ],
        workdir / f"train_{name}.log",
        training_environment(PRESET_CONFIG["num_workers"]),
    )
    return checkpoint


# The instruction-swapped evaluations of a policy trained on scenes with several blocks: result
# label -> `--env.success_target` (the block the original instruction named / the one now named).
INSTRUCTION_SWAP_EVALS = {
    "instruction swapped, original target": "original",
    "instruction swapped, new target": "instruction",
}


def eval_args(
    checkpoint: Path,
    output_dir: Path,
    episodes: int,
    num_blocks: int,
    env_options: dict[str, str],
    policy_options: dict[str, str] | None = None,
    start_seed: int = EVAL_START_SEED,
) -> list[str]:
    """`lerobot-eval` arguments of one evaluation; `env_options` become `--env.<name>=<value>` and
    `policy_options` `--policy.<name>=<value>`; episodes use env seeds `start_seed` onwards."""
    return [
        f"--policy.path={checkpoint}",
        *(f"--policy.{name}={value}" for name, value in (policy_options or {}).items()),
        "--env.type=touch_block",
        f"--env.num_blocks={num_blocks}",
        *(f"--env.{name}={value}" for name, value in env_options.items()),
        f"--eval.n_episodes={episodes}",
        "--eval.batch_size=10",
        f"--seed={start_seed}",
        f"--output_dir={output_dir}",
    ]


def evaluate(
    workdir: Path,
    checkpoint: Path,
    name: str,
    episodes: int,
    num_blocks: int,
    env_options: dict[str, str] | None = None,
    policy_options: dict[str, str] | None = None,
    start_seed: int = EVAL_START_SEED,
) -> float:
    """Success rate (%) of `lerobot-eval` run into `<workdir>/eval_<name>`."""
    output_dir = workdir / f"eval_{name}"
    run_lerobot(
        "lerobot_eval",
        eval_args(
            checkpoint, output_dir, episodes, num_blocks, env_options or {}, policy_options, start_seed
        ),
        workdir / f"eval_{name}.log",
    )
    info = json.loads((output_dir / "eval_info.json").read_text())
    return info["overall"]["pc_success"]


def instruction_evaluations(num_blocks: int) -> dict[str, dict[str, str]]:
    """Result label -> touch_block env options of each evaluation of a policy: the normal one ("")
    and, with several blocks per scene, the `INSTRUCTION_SWAP_EVALS`."""
    evaluations = {"": {}}
    if num_blocks >= 2:
        for label, success_target in INSTRUCTION_SWAP_EVALS.items():
            evaluations[label] = {"instruction_perturbation": "other_task", "success_target": success_target}
    return evaluations


def result_name(geometry: str, sampling: str, label: str) -> str:
    """Name of one evaluation in the results, e.g. "llava3d_fusion (geometry=depth), RTC, <label>"."""
    return ", ".join(part for part in (f"llava3d_fusion (geometry={geometry})", sampling, label) if part)


def policy_outcomes(
    checkpoint: Path, geometry: str, episodes: int, num_blocks: int, start_seed: int = EVAL_START_SEED
) -> dict[str, dict]:
    """Where the episodes of each of `instruction_evaluations` ended (`touch_block_outcomes`, the same
    seeds as lerobot-eval), by result name."""
    outcomes = {}
    for label, env_options in instruction_evaluations(num_blocks).items():
        name = result_name(geometry, "", label)
        summary = touch_block_outcomes(
            checkpoint, episodes, start_seed=start_seed, num_blocks=num_blocks, **env_options
        )
        outcomes[name] = dataclasses.asdict(summary)
    return outcomes


def evaluate_policy(
    workdir: Path,
    checkpoint: Path,
    geometry: str,
    episodes: int,
    num_blocks: int,
    rtc: bool = False,
    start_seed: int = EVAL_START_SEED,
) -> dict[str, float]:
    """Success rates (%) of a trained policy by result name: the normal evaluation and, with several
    blocks per scene, the `INSTRUCTION_SWAP_EVALS`; with `rtc`, each of them again with real-time
    chunking in `select_action` (re-plans guided by the previous chunk's unexecuted actions)."""
    evaluations = instruction_evaluations(num_blocks)
    samplings = {"": None, "RTC": {"rtc_config.enabled": "true"}} if rtc else {"": None}
    rates = {}
    for sampling, policy_options in samplings.items():
        for label, env_options in evaluations.items():
            name = result_name(geometry, sampling, label)
            run_name = "_".join(
                part
                for part in (
                    geometry,
                    sampling.lower(),
                    env_options and f"instruction_swapped_{env_options['success_target']}_target",
                )
                if part
            )
            rates[name] = evaluate(
                workdir, checkpoint, run_name, episodes, num_blocks, env_options, policy_options, start_seed
            )
    return rates


REFERENCE_POLICIES = ("expert", "expert without depth", "expert without language", "random")


def reference_target(env: touch_block.TouchBlockEnv, policy: str, rng: np.random.Generator) -> np.ndarray:
    """(3,) point a scripted reference policy heads for in the episode just reset.

    "expert" uses the named block's true top-centre. "expert without depth" knows everything the
    RGB image and the instruction show but not the heights: it assumes every block has the mid
    height of the range. "expert without language" knows the true tops but not which block is
    named: it picks one at random.
    """
    scene = env.scene
    if policy == "expert without depth":
        mid_height = float(np.mean(touch_block.BLOCK_HEIGHT_RANGE))
        scene = dataclasses.replace(scene, heights=np.full_like(scene.heights, mid_height))
    target = int(rng.integers(len(scene.colours))) if policy == "expert without language" else scene.target
    return env.renderer.block_top_centres(scene)[target]


def run_reference_episode(
    env: touch_block.TouchBlockEnv, policy: str, rng: np.random.Generator, seed: int
) -> tuple[float, list[dict]]:
    """One episode of a scripted reference policy: the end-effector's height after reset and the env's
    `info` after reset and after every step."""
    observation, info = env.reset(seed=seed)
    start_ee_z = float(observation["agent_pos"][2])
    infos = [info]
    target = reference_target(env, policy, rng)
    for _ in range(touch_block.DEFAULT_EPISODE_LENGTH):
        if policy == "random":
            action = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
        else:
            action = touch_block.expert_action(observation["agent_pos"], target, env.max_step)
        observation, _, terminated, truncated, info = env.step(action)
        infos.append(info)
        if terminated or truncated:
            break
    return start_ee_z, infos


def reference_env(policy: str, num_blocks: int) -> touch_block.TouchBlockEnv:
    if policy not in REFERENCE_POLICIES:
        raise ValueError(f"policy must be one of {REFERENCE_POLICIES}, got {policy!r}")
    return gym.make(touch_block.GYM_ID, disable_env_checker=True, num_blocks=num_blocks).unwrapped


def reference_success(
    policy: str, episodes: int, num_blocks: int = 3, start_seed: int = EVAL_START_SEED
) -> float:
    """Success rate (%) of a scripted reference policy (`REFERENCE_POLICIES`) on the episodes of env
    seeds `start_seed` onwards, as lerobot-eval's."""
    env = reference_env(policy, num_blocks)
    rng = np.random.default_rng(0)
    successes = 0
    for seed in range(start_seed, start_seed + episodes):
        _, infos = run_reference_episode(env, policy, rng, seed)
        successes += bool(infos[-1]["is_success"])
    return 100.0 * successes / episodes


# The references `side_view_traces` draws next to the trained policies: the expert with and without
# depth (the heights of the blocks' tops are what depth tells).
SIDE_VIEW_REFERENCES = ("expert", "expert without depth")


def side_view_traces(
    checkpoints: dict[str, Path], num_blocks: int, seed: int = EVAL_START_SEED
) -> list[EpisodeTrace]:
    """The episode of env seed `seed` (lerobot-eval's first) run by `SIDE_VIEW_REFERENCES` and by each
    trained policy (`checkpoints`: geometry -> checkpoint), step by step."""
    traces = []
    for policy in SIDE_VIEW_REFERENCES:
        env = reference_env(policy, num_blocks)
        start_ee_z, infos = run_reference_episode(env, policy, np.random.default_rng(0), seed)
        traces.append(EpisodeTrace.of(policy, start_ee_z, infos))
    for geometry, checkpoint in checkpoints.items():
        label = result_name(geometry, "", "")
        traces.append(policy_episode_trace(checkpoint, seed, label, num_blocks=num_blocks))
    return traces


def prepare_demo_data(
    workdir: Path,
    num_blocks: int,
    episodes: int,
    every_block_as_target: bool = False,
    near_target_starts: float = 0.0,
    seed: int = 0,
) -> tuple[str, Path, Path]:
    """(name of the data settings, dataset root, backbone directory) under `workdir`, written once
    per setting and reused by later runs with the same settings; `seed` is the demo seed
    (`dataset_seed`)."""
    data_name = f"{num_blocks}_blocks_{episodes}_episodes" + ("_every_block" if every_block_as_target else "")
    if near_target_starts > 0:
        data_name += f"_near_target_starts_{near_target_starts:g}"
    if seed:
        data_name += f"_seed_{seed}"
    dataset_root = workdir / f"dataset_{data_name}"
    if not dataset_root.exists():
        make_touch_block_dataset(
            root=dataset_root,
            repo_id="local/touch_block",
            num_episodes=episodes,
            seed=dataset_seed(seed),
            num_blocks=num_blocks,
            every_block_as_target=every_block_as_target,
            near_target_starts=near_target_starts,
        )
    return data_name, dataset_root, write_demo_backbone(workdir / "backbone")


def pretrain_demo_backbone(workdir: Path, backbone: Path, steps: int, images: int) -> Path:
    """The demo backbone after `steps` of VLM pretraining on `images` rendered scenes' image-text
    pairs (written once per setting under `workdir`)."""
    output = workdir / f"backbone_pretrained_{images}_images_{steps}_steps"
    if (output / "config.json").exists():
        logger.info("Reusing %s", output)
        return output
    pairs = touch_block_image_text_pairs(images, seed=0)
    summary = pretrain_vlm(
        backbone,
        pairs,
        output,
        steps=steps,
        lr=VLM_PRETRAINING_LR,
        validation_pairs=min(512, len(pairs) // 10),
    )
    (output / "pretraining.json").write_text(
        json.dumps({"images": images, "pairs": len(pairs), **summary}, indent=2)
    )
    return output


def training_run_name(data_name: str, args: argparse.Namespace) -> str:
    """Folder name of a training run: its data, steps and the training options that differ from the
    defaults, so that a run is reused only with the same settings."""
    run_name = f"{data_name}_{args.steps}_steps"
    if args.batch_size is not None:
        run_name += f"_batch_{args.batch_size}"
    if args.drop_n_last_frames:
        run_name += f"_drop_last_{args.drop_n_last_frames}"
    return run_name


def recipe_policy_options(args: argparse.Namespace) -> dict[str, int]:
    """The `--policy.<option>` values of the training recipe that the command line sets."""
    return {"drop_n_last_frames": args.drop_n_last_frames} if args.drop_n_last_frames else {}


def fill_block_dependent_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The command line's defaults that depend on `--num-blocks`: with several blocks every scene is
    recorded once per block, the episodes that start near the target are recorded on top of those that
    start above the blocks (500 scenes x 3 blocks and a quarter near the target: 2,000 episodes), and
    the policy trains longer, leaving each episode's last frames out of its samples."""
    several = args.num_blocks > 1
    if args.every_block_as_target is None:
        args.every_block_as_target = several
    if args.near_target_starts is None:
        args.near_target_starts = DEFAULT_NEAR_TARGET_STARTS
    if args.episodes is None:
        args.episodes = DEFAULT_SCENES * (args.num_blocks if args.every_block_as_target else 1)
        if several and args.near_target_starts < 1.0:
            args.episodes = round(args.episodes / (1.0 - args.near_target_starts))
    if args.steps is None:
        args.steps = DEFAULT_STEPS_SEVERAL_BLOCKS if several else DEFAULT_STEPS_ONE_BLOCK
    if args.drop_n_last_frames is None:
        args.drop_n_last_frames = DEFAULT_DROP_N_LAST_FRAMES_SEVERAL_BLOCKS if several else 0
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--episodes",
        type=int,
        help=f"expert episodes in the training set (default: {DEFAULT_SCENES} scenes, times the number "
        "of blocks with --every-block-as-target; with several blocks, divided by 1 - "
        "--near-target-starts: 2,000 for three blocks)",
    )
    parser.add_argument(
        "--num-blocks",
        type=int,
        default=1,
        help="blocks per scene; with more than one the instruction's colour picks the target",
    )
    parser.add_argument(
        "--every-block-as-target",
        action=argparse.BooleanOptionalAction,
        help="record each scene once per block, the instruction naming each in turn (same images, "
        "different instructions and actions); default: on with more than one block",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"training steps per policy (default: {DEFAULT_STEPS_ONE_BLOCK} with one block, "
        f"{DEFAULT_STEPS_SEVERAL_BLOCKS} with more)",
    )
    parser.add_argument(
        "--near-target-starts",
        type=float,
        help="fraction of the recorded episodes that start near the target's top, above or inside the "
        f"block, so the data shows the way back to it (0: all start above the blocks; default "
        f"{DEFAULT_NEAR_TARGET_STARTS:g}; with several blocks and no --episodes, the episodes are "
        "scaled up so that as many as without it start above the blocks)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"training batch size (default: the preset's, {PRESET_BATCH_SIZE}); the samples per second "
        "hardly change with it on a CPU, so a smaller batch gives more optimizer steps in the same time",
    )
    parser.add_argument(
        "--drop-n-last-frames",
        type=int,
        help="training: leave the last this many frames of every episode out of the samples "
        "(--policy.drop_n_last_frames, read by lerobot-train's sampler; their actions still train inside "
        f"earlier frames' chunks); 0: every frame (default: 0 with one block, "
        f"{DEFAULT_DROP_N_LAST_FRAMES_SEVERAL_BLOCKS} with several)",
    )
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument(
        "--save-freq",
        type=int,
        help="also keep a training checkpoint every this many steps (lerobot-train's --save_freq; default: "
        "the last step only), e.g. to follow the learning with bench/plateau.py; the run is the same",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help=f"moves every seed of the run: the training scenes (env seeds SEED*{SEED_STRIDE} onwards), "
        "lerobot-train's seed (weights, batch order, flow-matching noise: the preset's + SEED) and the "
        f"evaluation episodes and their sampling noise (lerobot-eval --seed={EVAL_START_SEED} + "
        f"SEED*{SEED_STRIDE}); 0: the README's run",
    )
    parser.add_argument("--geometry", nargs="+", default=["depth"], choices=["depth", "none"])
    parser.add_argument(
        "--rtc",
        action="store_true",
        help="also evaluate each policy with real-time chunking (--policy.rtc_config.enabled=true)",
    )
    parser.add_argument(
        "--outcomes",
        action="store_true",
        help="also report where each evaluation's episodes ended: at the named block or another, and "
        "how far off in x/y and height (python -m lerobot_llava3d_fusion.demo.touch_block_outcomes)",
    )
    parser.add_argument(
        "--vlm-pretraining-steps",
        type=int,
        default=0,
        help="steps of VLM pretraining on rendered image-text pairs before lerobot-train (0: none)",
    )
    parser.add_argument(
        "--vlm-pretraining-images", type=int, default=5000, help="rendered scenes for VLM pretraining"
    )
    args = fill_block_dependent_defaults(parser.parse_args(argv))
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    if args.drop_n_last_frames < 0:
        parser.error(f"--drop-n-last-frames must be 0 or more, got {args.drop_n_last_frames}")
    if args.save_freq is not None and args.save_freq < 1:
        parser.error(f"--save-freq must be positive, got {args.save_freq}")
    # force: an imported library may have configured the root logger already (it hid this output).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    datasets.disable_progress_bars()  # the episode bar only, not one `datasets` bar per saved episode
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    # Results of earlier runs are reused only when made with the same settings.
    data_name, dataset_root, backbone = prepare_demo_data(
        args.workdir,
        args.num_blocks,
        args.episodes,
        args.every_block_as_target,
        args.near_target_starts,
        args.seed,
    )
    start_seed = eval_start_seed(args.seed)
    pretraining = args.vlm_pretraining_steps > 0
    run_name = training_run_name(data_name, args)
    if pretraining:
        backbone = pretrain_demo_backbone(
            args.workdir, backbone, args.vlm_pretraining_steps, args.vlm_pretraining_images
        )
        run_name += f"_{backbone.name}"
    run_dir = args.workdir / run_name
    run_dir.mkdir(exist_ok=True)
    results = {
        policy: reference_success(policy, args.eval_episodes, args.num_blocks, start_seed)
        for policy in REFERENCE_POLICIES
    }
    outcomes = {}
    checkpoints = {}
    for geometry in tqdm(args.geometry, desc="policies", unit="policy"):
        checkpoint = train(
            run_dir,
            dataset_root,
            backbone,
            geometry,
            args.steps,
            pretraining,
            args.batch_size,
            seed=args.seed,
            save_freq=args.save_freq,
            policy_options=recipe_policy_options(args) or None,
        )
        checkpoints[geometry] = checkpoint
        results.update(
            evaluate_policy(
                run_dir, checkpoint, geometry, args.eval_episodes, args.num_blocks, args.rtc, start_seed
            )
        )
        if args.outcomes:
            outcomes.update(
                policy_outcomes(checkpoint, geometry, args.eval_episodes, args.num_blocks, start_seed)
            )

    summary = {
        "success_rate_pc": results,
        "eval_episodes": args.eval_episodes,
        "seed": args.seed,
        "dataset_start_seed": dataset_seed(args.seed),
        "training_seed": training_seed(args.seed),
        "eval_start_seed": start_seed,
        "train_steps": args.steps,
        "train_batch_size": args.batch_size or PRESET_BATCH_SIZE,
        "train_drop_n_last_frames": args.drop_n_last_frames,
        "train_episodes": args.episodes,
        "num_blocks": args.num_blocks,
        "every_block_as_target": args.every_block_as_target,
        "near_target_starts": args.near_target_starts,
        "vlm_pretraining_steps": args.vlm_pretraining_steps,
        "vlm_pretraining_images": args.vlm_pretraining_images if pretraining else 0,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    if outcomes:
        summary["where_episodes_ended"] = outcomes
    (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    figures = write_demo_figures(
        run_dir,
        results,
        REFERENCE_POLICIES,
        side_view_traces(checkpoints, args.num_blocks, start_seed),
        success_radius=TouchBlockEnvConfig.success_radius,
    )
    width = max(len(name) for name in results)
    table = "\n".join(f"  {name:<{width}} {rate:5.1f} %" for name, rate in results.items())
    logger.info(
        "touch_block (%d block(s) per scene) success over %d episodes (seeds %d+):\n%s\n"
        "total time: %s min; results in %s%s",
        args.num_blocks,
        args.eval_episodes,
        start_seed,
        table,
        summary["minutes"],
        run_dir / "results.json",
        "".join(f", {path.name}" for path in figures),
    )
    for name, outcome in outcomes.items():
        logger.info(
            "%s: ended nearest the target block %.1f %%, x/y within the radius %.1f %%, height within it "
            "%.1f %%; median x/y error %.2f cm, median height error %+.2f cm",
            name,
            outcome["ended_nearest_the_target_pc"],
            outcome["xy_within_radius_pc"],
            outcome["height_within_radius_pc"],
            outcome["median_xy_error_cm"],
            outcome["median_height_error_cm"],
        )


if __name__ == "__main__":
    main()
