"""The closed-loop demo, end to end through LeRobot's own scripts (`make demo`).

1. write a LeRobotDataset of scripted-expert touch_block episodes (RGB, depth, camera matrices);
2. train llava3d_fusion on it with `lerobot-train` (preset `configs/touch_block_demo.json`);
3. evaluate the checkpoint in closed loop with `lerobot-eval --env.type=touch_block`;
4. print its success rate next to the scripted expert's and a random policy's, on the same seeds.

`--geometry none depth` trains and evaluates one policy per geometry setting, to show what depth
adds. Everything runs offline on the CPU; results go to `<workdir>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from .envs import touch_block
from .envs.make_touch_block_dataset import make_touch_block_dataset
from .vlm import build_tiny_llava

logger = logging.getLogger(__name__)

PRESET = Path(__file__).resolve().parent.parent / "configs" / "touch_block_demo.json"
EVAL_START_SEED = 1000  # lerobot-eval's default seed; the dataset uses seeds 0 .. episodes - 1


def write_demo_backbone(directory: Path) -> Path:
    """A small random LLaVA checkpoint laid out like a real one (config, weights, tokenizer, image
    processor), sized for the demo: 64 px images in 8 px patches (an 8 x 8 grid, fine enough to
    localise a 5 cm block) and a 4-layer Qwen2 LLM of width 128."""
    if (directory / "config.json").exists():
        return directory
    from transformers import SiglipImageProcessor

    model, tokenizer = build_tiny_llava(
        image_size=64,
        patch_size=8,
        vision_hidden_size=64,
        text_sizes=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
        ),
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


def run_lerobot(script: str, args: list[str], log_path: Path) -> None:
    """Run one of LeRobot's unmodified command-line scripts, its output teed to `log_path`."""
    command = [sys.executable, "-m", f"lerobot.scripts.{script}", *args]
    logger.info("$ %s", " ".join(command))
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if "step:" in line or "Aggregated" in line or "Error" in line:
                sys.stderr.write(line)
        if process.wait() != 0:
            raise RuntimeError(f"{script} failed (exit {process.returncode}); see {log_path}")


def train(workdir: Path, dataset_root: Path, backbone: Path, geometry: str, steps: int) -> Path:
    output_dir = workdir / f"train_{geometry}"
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
            f"--policy.geometry={geometry}",
            f"--steps={steps}",
            f"--save_freq={steps}",
            f"--output_dir={output_dir}",
        ],
        workdir / f"train_{geometry}.log",
    )
    return checkpoint


def evaluate(workdir: Path, checkpoint: Path, geometry: str, episodes: int) -> float:
    output_dir = workdir / f"eval_{geometry}"
    run_lerobot(
        "lerobot_eval",
        [
            f"--policy.path={checkpoint}",
            "--env.type=touch_block",
            f"--eval.n_episodes={episodes}",
            "--eval.batch_size=10",
            f"--seed={EVAL_START_SEED}",
            f"--output_dir={output_dir}",
        ],
        workdir / f"eval_{geometry}.log",
    )
    info = json.loads((output_dir / "eval_info.json").read_text())
    return info["overall"]["pc_success"]


def reference_success(policy: str, episodes: int) -> float:
    """Success rate (%) of the scripted expert or uniform random actions, seeds as lerobot-eval's."""
    env = gym.make(touch_block.GYM_ID, disable_env_checker=True).unwrapped
    rng = np.random.default_rng(0)
    successes = 0
    for seed in range(EVAL_START_SEED, EVAL_START_SEED + episodes):
        observation, _ = env.reset(seed=seed)
        for _ in range(touch_block.DEFAULT_EPISODE_LENGTH):
            if policy == "expert":
                action = touch_block.expert_action(
                    observation["agent_pos"], env.target_position, env.max_step
                )
            else:
                action = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
            observation, _, terminated, _, info = env.step(action)
            if terminated:
                break
        successes += bool(info["is_success"])
    return 100.0 * successes / episodes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--episodes", type=int, default=200, help="expert episodes in the training set")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per policy")
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--geometry", nargs="+", default=["depth"], choices=["depth", "none"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    dataset_root = args.workdir / "dataset"
    if not dataset_root.exists():
        make_touch_block_dataset(
            root=dataset_root, repo_id="local/touch_block", num_episodes=args.episodes, seed=0
        )

    backbone = write_demo_backbone(args.workdir / "backbone")
    results = {
        "expert": reference_success("expert", args.eval_episodes),
        "random": reference_success("random", args.eval_episodes),
    }
    for geometry in tqdm(args.geometry, desc="policies", unit="policy"):
        checkpoint = train(args.workdir, dataset_root, backbone, geometry, args.steps)
        results[f"llava3d_fusion (geometry={geometry})"] = evaluate(
            args.workdir, checkpoint, geometry, args.eval_episodes
        )

    summary = {
        "success_rate_pc": results,
        "eval_episodes": args.eval_episodes,
        "train_steps": args.steps,
        "train_episodes": args.episodes,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=2))
    table = "\n".join(f"  {name:<36} {rate:5.1f} %" for name, rate in results.items())
    logger.info(
        "touch_block success over %d episodes (seeds %d+):\n%s\ntotal time: %s min; results in %s",
        args.eval_episodes,
        EVAL_START_SEED,
        table,
        summary["minutes"],
        args.workdir / "results.json",
    )


if __name__ == "__main__":
    main()
