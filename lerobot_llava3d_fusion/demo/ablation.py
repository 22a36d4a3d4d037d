"""Ablation of the action expert and the flow-matching choices on the touch_block demo, at equal
training time (`python -m lerobot_llava3d_fusion.demo.ablation`).

The demo's task and recipe (1 block per scene, `geometry=depth`, the shipped preset `touch_block_demo`,
its small backbone trained from scratch), with one thing changed per variant:

* `expert_mode`: `separate` (our default, at width x0.5, and at x0.25; x1.0 on request) against
  `shared` (the LLM's own layers: the original system's choice);
* `time_sampling`: `beta` (pi0's Beta(1.5, 1), our default) against `uniform` (U(0, 1), the original's),
  on the shared expert (and on the separate one on request);
* Euler steps at evaluation: every trained policy is evaluated with 10 steps (our default), the
  default and the original configuration also with 20 (the original's), through
  `lerobot-eval --policy.num_steps=N`.

Every variant gets the same training TIME, not the same number of steps: a short calibration run of
`lerobot-train` measures the variant's own step time (LeRobot's `updt_s + data_s`), and its real run
gets `--steps = budget / step time` (its cosine schedule decays over those steps). Each trained policy
is then evaluated with LeRobot's unmodified `lerobot-eval` on the same seeds, and its chunk latency
(`predict_action_chunk`, batch 1, median) is measured in this process on one touch_block observation.

Results go to `<workdir>/<settings>/results.json` (and a printed table), next to the scripted
references the demo prints. Everything runs offline on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch
from tqdm import tqdm

from lerobot_llava3d_fusion.demo.touch_block_demo import (
    EVAL_START_SEED,
    PRESET,
    PRESET_BATCH_SIZE,
    REFERENCE_POLICIES,
    prepare_demo_data,
    reference_success,
)
from lerobot_llava3d_fusion.envs.configs import touch_block_eval_observation

logger = logging.getLogger(__name__)

NUM_BLOCKS = 1
GEOMETRY = "depth"
# LeRobot's metrics line, e.g. "... updt_s:0.250 data_s:0.010 ...": averages since the previous line.
_STEP_TIMES = re.compile(r"\bupdt_s:([0-9.]+)\s+data_s:([0-9.]+)")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One trained policy: the demo preset with these action-expert and time-sampling settings."""

    name: str
    expert_mode: str
    expert_width_multiplier: float  # ignored by "shared" (the expert is the LLM itself)
    time_sampling: str

    def policy_args(self) -> list[str]:
        return [
            f"--policy.expert_mode={self.expert_mode}",
            f"--policy.expert_width_multiplier={self.expert_width_multiplier}",
            f"--policy.time_sampling={self.time_sampling}",
        ]


VARIANTS = (
    Variant("separate x0.5, beta (default)", "separate", 0.5, "beta"),
    Variant("separate x0.25, beta", "separate", 0.25, "beta"),
    Variant("separate x1.0, beta", "separate", 1.0, "beta"),
    Variant("shared, beta", "shared", 1.0, "beta"),
    Variant("shared, uniform (original)", "shared", 1.0, "uniform"),
    Variant("separate x0.5, uniform", "separate", 0.5, "uniform"),
)
# Trained by default (the others on request) to keep the whole run within ~40 minutes of this CPU.
DEFAULT_VARIANTS = tuple(VARIANTS[i].name for i in (0, 1, 3, 4))
# Also evaluated with 20 Euler steps: our default and the original system's configuration.
DEFAULT_STEP_VARIANTS = (VARIANTS[0].name, VARIANTS[4].name)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_lerobot(script: str, args: list[str], log_path: Path) -> tuple[str, float]:
    """Run one of LeRobot's unmodified scripts; returns (its output, wall seconds)."""
    command = [sys.executable, "-m", f"lerobot.scripts.{script}", *args]
    logger.info("$ %s", " ".join(command))
    start = time.monotonic()
    completed = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    seconds = time.monotonic() - start
    log_path.write_text(completed.stdout)
    if completed.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {completed.returncode}); see {log_path}")
    return completed.stdout, seconds


def step_seconds(log: str) -> float:
    """Mean training step time (update + data loading) over the metrics lines of a lerobot-train log.

    The first line averages over the first steps, which pay one-time costs (warm-up): it is left out
    when there are others.
    """
    times = [float(update) + float(data) for update, data in _STEP_TIMES.findall(log)]
    times = times[1:] or times
    if not times:
        raise RuntimeError("no 'updt_s:... data_s:...' metrics line in the lerobot-train log")
    return statistics.fmean(times)


def train_args(dataset_root: Path, backbone: Path, variant: Variant, steps: int, log_freq: int, out: Path):
    return [
        f"--config_path={PRESET}",
        f"--dataset.root={dataset_root}",
        f"--policy.vlm_model_name={backbone.resolve()}",
        f"--policy.geometry={GEOMETRY}",
        *variant.policy_args(),
        f"--policy.scheduler_decay_steps={steps}",
        f"--steps={steps}",
        f"--save_freq={steps}",
        f"--log_freq={log_freq}",
        f"--output_dir={out}",
    ]


def calibrate(run_dir: Path, dataset_root: Path, backbone: Path, variant: Variant, steps: int) -> float:
    """Seconds per training step of `variant`, measured by lerobot-train itself on a short run."""
    out = run_dir / f"calibrate_{slug(variant.name)}"
    log_freq = max(1, steps // 4)  # the first line (warm-up) is left out of the mean
    log, _ = run_lerobot(
        "lerobot_train",
        train_args(dataset_root, backbone, variant, steps, log_freq, out),
        run_dir / f"calibrate_{slug(variant.name)}.log",
    )
    return step_seconds(log)


def train(
    run_dir: Path,
    dataset_root: Path,
    backbone: Path,
    variant: Variant,
    budget_s: float,
    calibration_steps: int,
) -> dict:
    """Train `variant` for about `budget_s` seconds of training steps; reuses a finished run."""
    out = run_dir / f"train_{slug(variant.name)}"
    summary_path = run_dir / f"train_{slug(variant.name)}.json"
    checkpoint = out / "checkpoints" / "last" / "pretrained_model"
    if checkpoint.exists() and summary_path.exists():
        logger.info("Reusing %s", checkpoint)
        return json.loads(summary_path.read_text())
    calibrated = calibrate(run_dir, dataset_root, backbone, variant, calibration_steps)
    steps = max(1, round(budget_s / calibrated))
    logger.info("%s: %.3f s/step calibrated -> %d steps in %.0f s", variant.name, calibrated, steps, budget_s)
    log, wall = run_lerobot(
        "lerobot_train",
        train_args(dataset_root, backbone, variant, steps, max(1, steps // 20), out),
        run_dir / f"train_{slug(variant.name)}.log",
    )
    measured = step_seconds(log)
    summary = {
        "checkpoint": str(checkpoint),
        "calibrated_step_s": calibrated,
        "steps": steps,
        "step_s": measured,
        "train_s": measured * steps,
        "train_wall_s": wall,
        "samples_per_s": PRESET_BATCH_SIZE / measured,
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def evaluate(run_dir: Path, checkpoint: Path, variant: Variant, num_steps: int, episodes: int) -> float:
    """Success rate (%) of `checkpoint` with `num_steps` Euler steps, by lerobot-eval on the demo's seeds."""
    out = run_dir / f"eval_{slug(variant.name)}_{num_steps}_steps"
    info_path = out / "eval_info.json"
    if not info_path.exists():
        run_lerobot(
            "lerobot_eval",
            [
                f"--policy.path={checkpoint}",
                f"--policy.num_steps={num_steps}",
                "--env.type=touch_block",
                f"--env.num_blocks={NUM_BLOCKS}",
                f"--eval.n_episodes={episodes}",
                "--eval.batch_size=10",
                f"--seed={EVAL_START_SEED}",
                f"--output_dir={out}",
            ],
            run_dir / f"eval_{slug(variant.name)}_{num_steps}_steps.log",
        )
    return json.loads(info_path.read_text())["overall"]["pc_success"]


def chunk_latency(checkpoint: Path, num_steps: int, observation: dict, repeats: int) -> float:
    """Median seconds of one `predict_action_chunk` (batch 1, prefix cache on) with `num_steps` steps."""
    from lerobot.policies import make_pre_post_processors

    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

    policy = Llava3DFusionPolicy.from_pretrained(checkpoint)
    policy.config.num_steps = num_steps
    policy.eval()
    preprocessor, _ = make_pre_post_processors(policy.config, pretrained_path=str(checkpoint))
    batch = preprocessor({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in observation.items()})
    for _ in range(2):  # warm-up
        policy.predict_action_chunk(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        policy.predict_action_chunk(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_table(rows: list[dict], references: dict[str, float], episodes: int) -> str:
    header = (
        "| variant | Euler steps | train steps | training samples/s | chunk latency (ms) "
        f"| success over {episodes} episodes |"
    )
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['num_steps']} | {row['train_steps']} | {row['samples_per_s']:.1f} "
            f"| {1000 * row['chunk_latency_s']:.1f} | {row['success_pc']:.1f} % |"
        )
    for name, rate in references.items():
        lines.append(f"| scripted {name} | | | | | {rate:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("outputs/ablation"),
        help="where everything is written: dataset, checkpoints, logs and results.json (default: "
        "outputs/ablation under the current directory)",
    )
    parser.add_argument("--episodes", type=int, default=500, help="expert episodes in the training set")
    parser.add_argument(
        "--train-seconds", type=float, default=180.0, help="training time of every variant (seconds)"
    )
    parser.add_argument("--calibration-steps", type=int, default=8)
    parser.add_argument("--eval-episodes", type=int, default=30)
    parser.add_argument("--eval-steps", type=int, default=10, help="Euler steps of every evaluation")
    parser.add_argument("--more-eval-steps", type=int, default=20, help="Euler steps also evaluated for ...")
    parser.add_argument(
        "--more-steps-variants",
        nargs="*",
        default=list(DEFAULT_STEP_VARIANTS),
        metavar="NAME",
        help="... these variants",
    )
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of every script and of the latency measurement (1: steadier timings when shared)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=[v.name for v in VARIANTS],
        metavar="NAME",
        help=f"which variants to train, of {[v.name for v in VARIANTS]} (default: {list(DEFAULT_VARIANTS)})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    datasets.disable_progress_bars()
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Inherited by the scripts' subprocesses: without it each takes every core, and concurrent jobs on a
    # shared machine oversubscribe them (step times then measure the contention more than the model).
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    started = time.monotonic()

    data_name, dataset_root, backbone = prepare_demo_data(args.workdir, NUM_BLOCKS, args.episodes)
    run_dir = args.workdir / f"{data_name}_{args.train_seconds:g}_s"
    run_dir.mkdir(exist_ok=True)
    references = {
        policy: reference_success(policy, args.eval_episodes, NUM_BLOCKS) for policy in REFERENCE_POLICIES
    }
    observation = touch_block_eval_observation(EVAL_START_SEED, num_blocks=NUM_BLOCKS)

    variants = [v for v in VARIANTS if v.name in args.variants]
    rows = []
    expected_rows = len(variants) + len(set(args.more_steps_variants) & {v.name for v in variants})
    results_path = run_dir / "results.json"
    for variant in tqdm(variants, desc="variants", unit="variant"):
        trained = train(run_dir, dataset_root, backbone, variant, args.train_seconds, args.calibration_steps)
        checkpoint = Path(trained["checkpoint"])
        euler_steps = [args.eval_steps]
        if variant.name in args.more_steps_variants:
            euler_steps.append(args.more_eval_steps)
        for num_steps in euler_steps:
            rows.append(
                {
                    "variant": variant.name,
                    **dataclasses.asdict(variant),
                    "num_steps": num_steps,
                    "train_steps": trained["steps"],
                    "train_s": trained["train_s"],
                    "train_wall_s": trained["train_wall_s"],
                    "step_s": trained["step_s"],
                    "samples_per_s": trained["samples_per_s"],
                    "chunk_latency_s": chunk_latency(
                        checkpoint, num_steps, observation, args.latency_repeats
                    ),
                    "success_pc": evaluate(run_dir, checkpoint, variant, num_steps, args.eval_episodes),
                }
            )
        # Written after every variant, so an interrupted run leaves what it measured (marked partial).
        summary = {
            "complete": len(rows) == expected_rows,
            "rows": rows,
            "scripted_references_pc": references,
            "train_seconds_per_variant": args.train_seconds,
            "batch_size": PRESET_BATCH_SIZE,
            "eval_episodes": args.eval_episodes,
            "eval_seeds": [EVAL_START_SEED, EVAL_START_SEED + args.eval_episodes - 1],
            "train_episodes": args.episodes,
            "num_blocks": NUM_BLOCKS,
            "geometry": GEOMETRY,
            "torch_threads": torch.get_num_threads(),
            "minutes": round((time.monotonic() - started) / 60, 1),
        }
        results_path.write_text(json.dumps(summary, indent=2))

    table = format_table(rows, references, args.eval_episodes)
    logger.info("\n%s", table)
    logger.info("total time: %s min; results in %s", summary["minutes"], results_path)


if __name__ == "__main__":
    main()
