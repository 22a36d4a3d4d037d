"""Why 3D: touch_block success under a moved camera and sensor-like depth (docs/robustness.md).

Trains each policy once with the demo's recipe (`lerobot_llava3d_fusion.demo`: its dataset, backbone,
preset and training steps) and evaluates it with `lerobot-eval` at every perturbation, always on the
same episodes (seeds from the demo's `EVAL_START_SEED`):

1. `camera`: the camera moved at evaluation only, by each of `--camera-perturbations` (largest shift
   in m, largest turn in degrees about each axis), for `geometry=depth` with end-effector points
   (`geometry_origin=state`, the demo's), with world points (`geometry_origin=world`) and for
   `geometry=none`;
2. `depth_noise`: clean and RealSense-like depth (`--env.depth_noise=sensor`) at evaluation, for the
   depth policy trained on clean depth and one trained with `--policy.augment_depth_noise=true`;
3. `camera_training`: a depth policy trained on episodes whose camera poses were drawn per episode
   (`--training-camera-perturbation`), evaluated at every `--camera-perturbations` size; its
   evaluation episodes (seeds 1000+) draw other poses than its training episodes (seeds 0+).

Writes `<workdir>/<run>/robustness.json` (success rates; the targets of docs/robustness.md and
whether they are met; per camera move, the share of episodes whose target the moved camera does not
see and each policy's success over the episodes whose target it sees) and `robustness.png`
(`robustness_<N>_draws.*` with `--eval-draws N`); a rerun reuses the dataset, checkpoints,
evaluations and outcomes it finds. Each training takes 30-50 min on 2 CPU cores.

    python bench/robustness.py --workdir outputs/robustness            # all three
    python bench/robustness.py --experiments camera --eval-episodes 20
    python bench/robustness.py --experiments camera depth_noise --policies depth_ee_points no_geometry
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lerobot_llava3d_fusion.demo import touch_block_demo as demo
from lerobot_llava3d_fusion.demo.make_touch_block_dataset import make_touch_block_dataset
from lerobot_llava3d_fusion.demo.touch_block_outcomes import touch_block_outcomes
from lerobot_llava3d_fusion.envs import touch_block
from lerobot_llava3d_fusion.geometry.patch_points import backproject_depth

logger = logging.getLogger(__name__)

EXPERIMENTS = ("camera", "depth_noise", "camera_training")
POLICIES = (
    "depth_ee_points",
    "depth_world_points",
    "no_geometry",
    "depth_noise_trained",
    "depth_camera_trained",
)
# (largest shift in m, largest turn in degrees): none, small, medium, large.
DEFAULT_CAMERA_PERTURBATIONS = ((0.0, 0.0), (0.02, 2.0), (0.05, 5.0), (0.10, 10.0))
MEDIUM_CAMERA_PERTURBATION = (0.05, 5.0)
DEPTH_NOISES = ("none", "sensor")
# The targets: the depth policies keep this share of their unperturbed success under the medium
# camera move; the noise-trained policy loses at most this many points under sensor noise.
CAMERA_RETENTION_TARGET = 0.8
NOISE_DROP_TARGET = 10.0


@dataclass(frozen=True)
class Training:
    """One policy to train: its geometry, extra `--policy.*` options and the dataset's camera moves."""

    geometry: str
    policy_options: dict[str, str] = field(default_factory=dict)
    camera_perturbation: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Evaluation:
    """One lerobot-eval run: which policy, which `--env.*` options, and the experiment it belongs to."""

    experiment: str
    policy: str
    label: str
    env_options: dict[str, float | str]  # TouchBlockEnvConfig fields: `--env.<name>=<value>`
    draw: int = 0  # which set of evaluation episodes: the demo's `--seed <draw>` ones

    @property
    def name(self) -> str:
        return f"{self.policy}_{self.label}" + (f"_draw_{self.draw}" if self.draw else "")

    @property
    def start_seed(self) -> int:
        return demo.eval_start_seed(self.draw)


def camera_label(translation: float, rotation: float) -> str:
    return f"camera_{translation * 100:g}cm_{rotation:g}deg"


def camera_options(translation: float, rotation: float) -> dict[str, float]:
    return {"camera_translation_perturbation": translation, "camera_rotation_perturbation": rotation}


def trainings(training_camera_perturbation: tuple[float, float]) -> dict[str, Training]:
    """Every policy an experiment may need, by name."""
    return {
        "depth_ee_points": Training("depth"),  # the demo's preset: geometry_origin=state
        "depth_world_points": Training("depth", {"geometry_origin": "world"}),
        "no_geometry": Training("none"),
        "depth_noise_trained": Training("depth", {"augment_depth_noise": "true"}),
        "depth_camera_trained": Training("depth", camera_perturbation=training_camera_perturbation),
    }


def plan(
    experiments: list[str],
    camera_perturbations: list[tuple[float, float]],
    policies: list[str] = POLICIES,
    draws: int = 1,
) -> list[Evaluation]:
    """The evaluations of `experiments` for the `policies` among theirs, each policy's in a fixed order
    (no duplicates), each on `draws` disjoint sets of episodes."""
    evaluations: list[Evaluation] = []
    for experiment in experiments:
        if experiment == "camera":
            for policy in ("depth_ee_points", "depth_world_points", "no_geometry"):
                for size in camera_perturbations:
                    label, options = camera_label(*size), camera_options(*size)
                    evaluations.append(Evaluation(experiment, policy, label, options))
        elif experiment == "depth_noise":
            for policy in ("depth_ee_points", "depth_noise_trained"):
                for noise in DEPTH_NOISES:
                    options = {"depth_noise": noise}
                    evaluations.append(Evaluation(experiment, policy, f"depth_{noise}", options))
        elif experiment == "camera_training":
            for size in camera_perturbations:
                evaluations.append(
                    Evaluation(experiment, "depth_camera_trained", camera_label(*size), camera_options(*size))
                )
        else:
            raise ValueError(f"unknown experiment {experiment!r}; choose from {EXPERIMENTS}")
    return [
        dataclasses.replace(evaluation, draw=draw)
        for evaluation in evaluations
        if evaluation.policy in policies
        for draw in range(draws)
    ]


def draws_text(rates: list[float]) -> str:
    """ "92.0 %", or over several draws "86.0 % (80.0-92.0 %, 3 draws)"."""
    if len(rates) == 1:
        return f"{rates[0]:.1f} %"
    return f"{np.mean(rates):.1f} % ({min(rates):.1f}-{max(rates):.1f} %, {len(rates)} draws)"


def parse_camera_perturbation(text: str) -> tuple[float, float]:
    """ "0.05,5" -> (0.05, 5.0): largest shift (m), largest turn (degrees)."""
    try:
        translation, rotation = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a camera perturbation is 'METRES,DEGREES' (e.g. 0.05,5), got {text!r}"
        ) from None
    return translation, rotation


def target_checks(
    rates: dict[str, dict[str, float]], camera_perturbations: list[tuple[float, float]]
) -> dict[str, dict]:
    """The issue's targets, for the rates that were measured: the medium camera move keeps
    `CAMERA_RETENTION_TARGET` of each depth policy's unperturbed success, and sensor noise costs the
    noise-trained policy at most `NOISE_DROP_TARGET` points."""
    checks = {}
    nominal, medium = camera_label(0.0, 0.0), camera_label(*MEDIUM_CAMERA_PERTURBATION)
    if MEDIUM_CAMERA_PERTURBATION in camera_perturbations:
        for policy in ("depth_ee_points", "depth_world_points", "depth_camera_trained"):
            policy_rates = rates.get(policy, {})
            if nominal in policy_rates and medium in policy_rates:
                retention = policy_rates[medium] / policy_rates[nominal] if policy_rates[nominal] else 0.0
                checks[f"{policy}: medium camera move"] = {
                    "retained_share": retention,
                    "target": f">= {CAMERA_RETENTION_TARGET}",
                    "met": retention >= CAMERA_RETENTION_TARGET,
                }
    noise_rates = rates.get("depth_noise_trained", {})
    if {"depth_none", "depth_sensor"} <= set(noise_rates):
        drop = noise_rates["depth_none"] - noise_rates["depth_sensor"]
        checks["depth_noise_trained: sensor depth"] = {
            "drop_points": drop,
            "target": f"<= {NOISE_DROP_TARGET}",
            "met": drop <= NOISE_DROP_TARGET,
        }
    return checks


def moved_camera_env(camera_perturbation: tuple[float, float], num_blocks: int) -> touch_block.TouchBlockEnv:
    """A touch_block env whose camera each reset moves by up to `camera_perturbation` (m, degrees)."""
    translation, rotation = camera_perturbation
    return touch_block.TouchBlockEnv(
        num_blocks=num_blocks,
        camera_translation_perturbation=translation,
        camera_rotation_perturbation=rotation,
    )


def targets_out_of_view(
    camera_perturbations: list[tuple[float, float]],
    episodes: int,
    num_blocks: int,
    start_seed: int = demo.EVAL_START_SEED,
) -> dict[str, list[bool]]:
    """Per evaluation episode (seeds from `start_seed`), whether the moved camera does not see its
    target's top-centre (it projects outside the image), by camera label: what no policy that needs to
    see its target can succeed at."""
    masks = {}
    for size in camera_perturbations:
        env = moved_camera_env(size, num_blocks)
        out = []
        for seed in range(start_seed, start_seed + episodes):
            observation, _ = env.reset(seed=seed)
            extrinsics = observation[touch_block.EXTRINSICS_ENTRY].astype(np.float64)
            camera = extrinsics[:3, :3].T @ (env.target_position - extrinsics[:3, 3])
            column, row = (observation[touch_block.INTRINSICS_ENTRY] @ (camera / camera[2]))[:2]
            height, width = observation[touch_block.DEPTH_ENTRY].shape[-2:]
            out.append(not (-0.5 <= column < width - 0.5 and -0.5 <= row < height - 0.5))
        masks[camera_label(*size)] = out
    return masks


def pixel_point_spread_mm(
    camera_perturbation: tuple[float, float], episodes: int, num_blocks: int
) -> dict[str, float]:
    """How much a pixel's 3D point varies across episodes (first frames, seeds from 0), in mm: the
    standard deviation of its x and y over the episodes, averaged over pixels, for world points and
    for points measured from the end-effector (`geometry_origin=state`). Where a pixel's world x/y
    barely varies (a fixed camera: only through depth), world points tell the policy little that the
    patch's place in the image does not; a policy that localises by that place fails when the camera
    moves."""
    env = moved_camera_env(camera_perturbation, num_blocks)
    world, from_end_effector = [], []
    for seed in range(episodes):
        observation, _ = env.reset(seed=seed)
        points, _ = backproject_depth(
            torch.from_numpy(observation[touch_block.DEPTH_ENTRY]).double()[None],
            torch.from_numpy(observation[touch_block.INTRINSICS_ENTRY]).double(),
            torch.from_numpy(observation[touch_block.EXTRINSICS_ENTRY]).double(),
        )
        world.append(points[0])
        from_end_effector.append(points[0] - torch.from_numpy(observation["agent_pos"]).double())
    return {
        name: float(torch.stack(values)[..., :2].std(dim=0).mean() * 1000)
        for name, values in (("world", world), ("end_effector", from_end_effector))
    }


def success_in_view(
    run_dir: Path, evaluations: list[Evaluation], out_of_view: dict[int, dict[str, list[bool]]]
) -> dict[str, dict[str, float]]:
    """Success rate (%) over the episodes whose target the camera sees, per policy and camera move,
    over all its draws (`out_of_view` by draw, then camera label): what is left of a drop once the
    targets the move took out of the image are set aside. Read from each lerobot-eval run's
    per-episode successes (in seed order)."""
    counts: dict[tuple[str, str], list[int]] = {}
    for evaluation in evaluations:
        if evaluation.label not in out_of_view[evaluation.draw]:
            continue
        info = json.loads((run_dir / f"eval_{evaluation.name}" / "eval_info.json").read_text())
        (task,) = info["per_task"]  # touch_block has one task
        successes = task["metrics"]["successes"]
        mask = out_of_view[evaluation.draw][evaluation.label]
        if len(successes) != len(mask):
            raise ValueError(
                f"eval_{evaluation.name} holds {len(successes)} episodes, not {len(mask)}: "
                "rerun it with this --eval-episodes"
            )
        seen = [success for success, out in zip(successes, mask, strict=True) if not out]
        count = counts.setdefault((evaluation.policy, evaluation.label), [0, 0])
        count[0] += sum(seen)
        count[1] += len(seen)
    rates: dict[str, dict[str, float]] = {}
    for (policy, label), (successes, episodes) in counts.items():
        if episodes:
            rates.setdefault(policy, {})[label] = 100.0 * successes / episodes
    return rates


def write_figure(path: Path, rates: dict[str, dict[str, float]], camera_perturbations) -> Path | None:
    """Success against camera perturbation size (one line per policy) and clean against sensor depth
    (bars); None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            'matplotlib is not installed: no figure (pip install "lerobot_policy_llava3d_fusion[demo]")'
        )
        return None
    figure = Figure(figsize=(10, 4), layout="constrained")
    camera_axes, noise_axes = figure.subplots(1, 2)
    sizes = [f"{t * 100:g} cm / {r:g}°" for t, r in camera_perturbations]
    for policy, policy_rates in rates.items():
        values = [policy_rates.get(camera_label(*size)) for size in camera_perturbations]
        if any(value is not None for value in values):
            points = [(i, v) for i, v in enumerate(values) if v is not None]
            camera_axes.plot(*zip(*points, strict=True), marker="o", label=policy)
    camera_axes.set(xticks=range(len(sizes)), xticklabels=sizes, ylim=(0, 100), ylabel="success (%)")
    camera_axes.set(xlabel="camera moved by up to (each axis)", title="moved camera (evaluation)")
    camera_axes.legend(fontsize="small")
    noise_policies = [
        policy
        for policy in ("depth_ee_points", "depth_noise_trained")
        if "depth_sensor" in rates.get(policy, {})
    ]
    for offset, noise in ((-0.2, "none"), (0.2, "sensor")):
        values = [rates[p].get(f"depth_{noise}", 0.0) for p in noise_policies]
        positions = [i + offset for i in range(len(noise_policies))]
        noise_axes.bar(positions, values, width=0.4, label=f"depth: {noise}")
    noise_axes.set(xticks=range(len(noise_policies)), xticklabels=noise_policies, ylim=(0, 100))
    noise_axes.set(ylabel="success (%)", title="sensor-like depth (evaluation)")
    noise_axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def dataset_for(args, training: Training, clean_root: Path) -> Path:
    """The training set of `training`: the demo's, or the same episodes with the camera moved."""
    if training.camera_perturbation == (0.0, 0.0):
        return clean_root
    translation, rotation = training.camera_perturbation
    root = clean_root.with_name(f"{clean_root.name}_{camera_label(translation, rotation)}")
    if not root.exists():
        make_touch_block_dataset(
            root=root,
            repo_id="local/touch_block",
            num_episodes=args.episodes,
            seed=0,
            num_blocks=args.num_blocks,
            every_block_as_target=args.every_block_as_target,
            near_target_starts=args.near_target_starts,
            camera_translation_perturbation=translation,
            camera_rotation_perturbation=rotation,
        )
    return root


def evaluate_once(run_dir: Path, checkpoint: Path, evaluation: Evaluation, args) -> float:
    """Success rate (%) of one evaluation, reusing its eval_info.json when a former run wrote it."""
    info_path = run_dir / f"eval_{evaluation.name}" / "eval_info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())["overall"]["pc_success"]
    return demo.evaluate(
        run_dir,
        checkpoint,
        evaluation.name,
        args.eval_episodes,
        args.num_blocks,
        evaluation.env_options,
        start_seed=evaluation.start_seed,
    )


def outcomes_once(run_dir: Path, checkpoint: Path, evaluation: Evaluation, args) -> dict:
    """Where the episodes of `evaluation` ended (`touch_block_outcomes`), reusing the file a former run
    wrote for the same number of episodes."""
    path = run_dir / f"outcomes_{evaluation.name}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("episodes") == args.eval_episodes:
            return saved
    summary = dataclasses.asdict(
        touch_block_outcomes(
            checkpoint,
            args.eval_episodes,
            start_seed=evaluation.start_seed,
            num_blocks=args.num_blocks,
            **evaluation.env_options,
        )
    )
    path.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("outputs/robustness"))
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        choices=POLICIES,
        help="train and evaluate only these of the experiments' policies (default: all of them)",
    )
    parser.add_argument("--num-blocks", type=int, default=1, help="blocks per scene (the demo's option)")
    parser.add_argument("--episodes", type=int, help="training episodes (default: the demo's)")
    parser.add_argument("--steps", type=int, help="training steps per policy (default: the demo's)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: the preset's)")
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument(
        "--eval-draws",
        type=int,
        default=1,
        help="evaluate every cell on this many disjoint sets of --eval-episodes episodes (the demo's "
        "`--seed 0, 1, ...` evaluation seeds, each with its own sampling noise); the rates are their "
        "mean, with each draw's rate in the JSON",
    )
    parser.add_argument(
        "--camera-perturbations",
        nargs="+",
        type=parse_camera_perturbation,
        default=list(DEFAULT_CAMERA_PERTURBATIONS),
        metavar="METRES,DEGREES",
        help="evaluation camera moves (default: 0,0 0.02,2 0.05,5 0.1,10)",
    )
    parser.add_argument(
        "--training-camera-perturbation",
        type=parse_camera_perturbation,
        default=MEDIUM_CAMERA_PERTURBATION,
        metavar="METRES,DEGREES",
        help="camera moves drawn per training episode for the camera_training experiment (default 0.05,5)",
    )
    parser.add_argument(
        "--outcomes",
        action="store_true",
        help="also record where the episodes ended under the medium camera move and sensor depth",
    )
    args = parser.parse_args(argv)
    if args.eval_draws < 1:
        parser.error(f"--eval-draws must be at least 1, got {args.eval_draws}")
    args.every_block_as_target = args.near_target_starts = args.drop_n_last_frames = None
    return demo.fill_block_dependent_defaults(args)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_name, clean_root, backbone = demo.prepare_demo_data(
        args.workdir, args.num_blocks, args.episodes, args.every_block_as_target, args.near_target_starts
    )
    run_dir = args.workdir / demo.training_run_name(data_name, args)
    run_dir.mkdir(exist_ok=True)

    evaluations = plan(args.experiments, args.camera_perturbations, args.policies, args.eval_draws)
    if not evaluations:
        raise SystemExit(
            f"none of --policies {' '.join(args.policies)} takes part in --experiments "
            f"{' '.join(args.experiments)}"
        )
    policies = trainings(args.training_camera_perturbation)
    checkpoints: dict[str, Path] = {}
    draw_rates: dict[str, dict[str, list[float]]] = {}
    outcomes: dict[str, dict] = {}
    for evaluation in evaluations:
        training = policies[evaluation.policy]
        if evaluation.policy not in checkpoints:
            checkpoints[evaluation.policy] = demo.train(
                run_dir,
                dataset_for(args, training, clean_root),
                backbone,
                training.geometry,
                args.steps,
                pretrained_backbone=False,
                batch_size=args.batch_size,
                policy_options={**demo.recipe_policy_options(args), **training.policy_options},
                name=evaluation.policy,
            )
        checkpoint = checkpoints[evaluation.policy]
        rate = evaluate_once(run_dir, checkpoint, evaluation, args)
        draw_rates.setdefault(evaluation.policy, {}).setdefault(evaluation.label, []).append(rate)
        perturbed = evaluation.label in (camera_label(*MEDIUM_CAMERA_PERTURBATION), "depth_sensor")
        if args.outcomes and perturbed and evaluation.draw == 0:
            outcomes[evaluation.name] = outcomes_once(run_dir, checkpoint, evaluation, args)

    rates = {
        policy: {label: float(np.mean(values)) for label, values in by_label.items()}
        for policy, by_label in draw_rates.items()
    }
    out_of_view = {
        draw: targets_out_of_view(
            args.camera_perturbations, args.eval_episodes, args.num_blocks, demo.eval_start_seed(draw)
        )
        for draw in range(args.eval_draws)
    }
    results = {
        "success_rate_pc": rates,
        "targets": target_checks(rates, args.camera_perturbations),
        "target_out_of_view_pc": {
            label: 100.0
            * sum(sum(masks[label]) for masks in out_of_view.values())
            / sum(len(masks[label]) for masks in out_of_view.values())
            for label in out_of_view[0]
        },
        "success_in_view_pc": success_in_view(run_dir, evaluations, out_of_view),
        "pixel_point_spread_mm": {
            camera_label(*size): pixel_point_spread_mm(size, args.eval_episodes, args.num_blocks)
            for size in {(0.0, 0.0), args.training_camera_perturbation}
        },
        "eval_episodes": args.eval_episodes,
        "eval_draws": args.eval_draws,
        "eval_start_seeds": [demo.eval_start_seed(draw) for draw in range(args.eval_draws)],
        "num_blocks": args.num_blocks,
        "train_steps": args.steps,
        "train_episodes": args.episodes,
        "camera_perturbations": [list(size) for size in args.camera_perturbations],
        "training_camera_perturbation": list(args.training_camera_perturbation),
    }
    if args.eval_draws > 1:
        results["success_rate_pc_per_draw"] = draw_rates
    if outcomes:
        results["where_episodes_ended"] = outcomes
    # One draw: robustness.json; several: their own file, so the one-draw record of every cell stays.
    stem = "robustness" + (f"_{args.eval_draws}_draws" if args.eval_draws > 1 else "")
    results_path = run_dir / f"{stem}.json"
    results_path.write_text(json.dumps(results, indent=2, default=str))
    figure = write_figure(run_dir / f"{stem}.png", rates, args.camera_perturbations)
    for policy, by_label in draw_rates.items():
        print(f"{policy}:", ", ".join(f"{label} {draws_text(values)}" for label, values in by_label.items()))
    for policy, policy_rates in results["success_in_view_pc"].items():
        print(
            f"{policy}, episodes whose target the camera sees:",
            ", ".join(f"{label} {rate:.1f} %" for label, rate in policy_rates.items()),
        )
    for check, outcome in results["targets"].items():
        print(f"target {check}: {'met' if outcome['met'] else 'MISSED'} ({outcome})")
    print(f"results: {results_path}" + (f", {figure}" if figure else ""))
    return results


if __name__ == "__main__":
    main()
