"""Where the three-block demo's loss plateau comes from: when the colour word starts to count.

With several blocks per scene, the demo records every scene once per block: the first frames of those
episodes show the same image and state, and only the instruction's colour word tells their action
chunks apart. This script follows a demo training run through its checkpoints (run the demo with
`--save-freq N` to keep one every N steps) and measures, on fixed samples of its training set:

- the flow-matching loss (fixed noise and flow time, the policy in eval mode) with the sample's own
  instruction and with the colour word of another block of the same scene (the instruction of the
  same scene's episode that targets that block), split into the episodes' first frames (only the
  colour word tells the target) and later frames (where the end-effector's motion also tells it);
- the same two losses by how many frames before its episode's end a sample lies (the frames near the
  end show the end-effector at its block, where the colour word is not needed);
- how much of the action expert's attention (its state and action queries, averaged over heads and
  queries) lands on the colour word's key in each layer, against the share of a uniform attention over
  the keys those queries see.

It also reads the training loss the run logged (`train_<name>.log`, one line per `log_freq` steps)
and reports the plateau exit: the first logged step after which the loss stays below `--exit-loss`,
in steps and in samples (steps x batch size). That needs no intermediate checkpoints, but it depends on
which frames the run samples (a run with `--drop-n-last-frames` leaves out frames of low loss, so its
logged loss is higher at the same skill). The checkpoints give a measure that does not: the first one
from which a swapped colour word costs the first frames at least `--colour-bound-ratio` times their
own loss (the colour word is bound), on the same fixed samples for every run of a dataset.

    .venv/bin/python bench/plateau.py --run-dir outputs/demo/<run> --dataset-root outputs/demo/<dataset>

Writes `plateau.json` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from common import print_table, write_json
from lerobot.datasets import LeRobotDataset
from lerobot.utils.constants import OBS_LANGUAGE_TOKENS
from torch.utils.data import default_collate
from tqdm import tqdm

from lerobot_llava3d_fusion.envs import touch_block
from lerobot_llava3d_fusion.model import fusion
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

LOSS_LINE = re.compile(r"\bstep:\S+ .*\bloss:([\d.]+)")
DEFAULT_EXIT_LOSS = 0.25  # between the plateau (about 0.4) and the trained loss (0.05-0.1)
# On the plateau a swapped colour word changes the first frames' loss by a few percent; once the word
# is bound it multiplies it (8x one checkpoint after the exit of the demo's seed 2).
DEFAULT_COLOUR_BOUND_RATIO = 2.0


def logged_losses(log_path: Path, log_freq: int) -> list[tuple[int, float]]:
    """(step, loss) of every training log line; LeRobot logs once every `log_freq` steps from step
    `log_freq` on, and prints the step rounded (e.g. "6K"), so the steps come from the lines' order."""
    losses = [
        float(match.group(1)) for match in map(LOSS_LINE.search, log_path.read_text().splitlines()) if match
    ]
    return [((index + 1) * log_freq, loss) for index, loss in enumerate(losses)]


def plateau_exit(losses: list[tuple[int, float]], exit_loss: float) -> int | None:
    """The first logged step from which every logged loss is below `exit_loss` (None: never)."""
    exit_step = None
    for step, loss in losses:
        if loss >= exit_loss:
            exit_step = None
        elif exit_step is None:
            exit_step = step
    return exit_step


def colour_bound_step(probes: dict[int, dict], ratio: float) -> int | None:
    """The first probed checkpoint step from which every later probe's first-frame loss with a swapped
    colour word is at least `ratio` times the loss with the own one (None: never)."""
    bound_step = None
    for step in sorted(probes):
        probe = probes[step]
        if probe["loss_first_frames_colour_swapped"] < ratio * probe["loss_first_frames"]:
            bound_step = None
        elif bound_step is None:
            bound_step = step
    return bound_step


def training_checkpoints(train_dir: Path) -> list[tuple[int, Path]]:
    """(step, pretrained_model directory) of every numbered checkpoint of a lerobot-train output."""
    checkpoints = []
    for directory in sorted((train_dir / "checkpoints").iterdir()):
        if directory.name.isdigit() and (directory / "pretrained_model").is_dir():
            checkpoints.append((int(directory.name), directory / "pretrained_model"))
    return checkpoints


@dataclass
class ProbeSamples:
    """Fixed training samples, each with its own instruction and another block's (same scene)."""

    indices: list[int]
    first_frame: np.ndarray  # (N,) bool: the episode's first frame
    frames_to_end: np.ndarray  # (N,) int: frames after this one in its episode (0: the last frame)
    swapped_tasks: list[str]


# Groups of samples by frames to their episode's end: (first, last) inclusive, None: no upper bound.
FRAMES_TO_END_GROUPS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, None))


def frames_to_end_label(first: int, last: int | None) -> str:
    return f"{first}+" if last is None else f"{first}-{last}"


def losses_by_frames_to_end(frames_to_end: np.ndarray, own: torch.Tensor, swapped: torch.Tensor) -> dict:
    """Mean own / swapped-colour loss and sample count of each `FRAMES_TO_END_GROUPS` group that has
    samples, by its label ("0-1", ..., "10+")."""
    groups = {}
    for first, last in FRAMES_TO_END_GROUPS:
        member = torch.from_numpy(
            (frames_to_end >= first) & (frames_to_end <= (last if last is not None else np.inf))
        )
        if member.any():
            groups[frames_to_end_label(first, last)] = {
                "samples": int(member.sum()),
                "loss": own[member].mean().item(),
                "loss_colour_swapped": swapped[member].mean().item(),
            }
    return groups


def probe_samples(dataset: LeRobotDataset, num_blocks: int, per_group: int, seed: int) -> ProbeSamples:
    """`per_group` first frames and `per_group` later frames (fewer if the set has fewer) drawn from the episodes of the training
    set (recorded with every block as target: episode e targets block e % num_blocks of scene
    e // num_blocks), each with the instruction of the next block's episode of its scene."""
    columns = dataset.hf_dataset.select_columns(["episode_index", "frame_index"]).with_format("numpy")[:]
    episodes, frames = columns["episode_index"], columns["frame_index"]
    tasks = [
        dataset.meta.episodes[int(episode)]["tasks"][0] for episode in range(dataset.meta.total_episodes)
    ]
    rng = np.random.default_rng(seed)
    first = np.flatnonzero(frames == 0)
    later = np.flatnonzero(frames > 0)
    chosen = np.concatenate(
        [rng.choice(group, min(per_group, len(group)), replace=False) for group in (first, later)]
    )
    frames_to_end = np.bincount(episodes)[episodes] - 1 - frames  # (frames,)
    swapped = []
    for index in chosen:
        episode = int(episodes[index])
        sibling = episode - episode % num_blocks + (episode + 1) % num_blocks
        own, other = tasks[episode].split(), tasks[sibling].split()
        if len(own) != len(other) or sum(a != b for a, b in zip(own, other)) != 1:
            raise ValueError(
                f"episodes {episode} and {sibling} should name two blocks of one scene (the demo's "
                f"--every-block-as-target layout with --num-blocks {num_blocks}), got {tasks[episode]!r} "
                f"and {tasks[sibling]!r}"
            )
        swapped.append(tasks[sibling])
    return ProbeSamples([int(i) for i in chosen], frames[chosen] == 0, frames_to_end[chosen], swapped)


@contextmanager
def recorded_suffix_attention(suffix_length: int, records: list[torch.Tensor]) -> Iterator[None]:
    """While active, every fused attention call appends the (B, Ls, Lk) attention probabilities of the
    last `suffix_length` queries (the action expert's), averaged over heads, to `records`. Each call
    checks that those probabilities, applied to the values, give the attention output the model uses."""
    attend = fusion._attend

    def recording_attend(layer, q, k, v, mask):
        output = attend(layer, q, k, v, mask)  # (B, Lq, H * D)
        repeats = q.shape[1] // k.shape[1]  # grouped-query heads
        keys, values = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        scores = (q[:, :, -suffix_length:] @ keys.transpose(-1, -2)) * layer.self_attn.scaling
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, -suffix_length:], float("-inf"))
        probabilities = scores.softmax(-1)  # (B, H, Ls, Lk)
        recomputed = (probabilities @ values).transpose(1, 2).flatten(2)
        if not torch.allclose(recomputed, output[:, -suffix_length:], atol=1e-4, rtol=1e-4):
            raise RuntimeError("the recorded attention does not reproduce the model's attention output")
        records.append(probabilities.mean(1))
        return output

    with mock.patch.object(fusion, "_attend", recording_attend):
        yield


def colour_key_positions(tokens: torch.Tensor, swapped_tokens: torch.Tensor) -> torch.Tensor:
    """(B,) position in the task tokens of the one token that differs between the two instructions."""
    differs = tokens != swapped_tokens
    if not bool((differs.sum(1) == 1).all()):
        raise ValueError("the instructions should differ in exactly one token (the colour word)")
    return differs.int().argmax(1)


@torch.no_grad()
def probe_checkpoint(
    checkpoint: Path, dataset: LeRobotDataset, samples: ProbeSamples, batch_size: int, seed: int
) -> dict:
    """Losses by group with the own and the swapped instruction, and the expert's attention share on
    the colour word per layer, for one checkpoint."""
    from lerobot.policies import make_pre_post_processors

    policy = Llava3DFusionPolicy.from_pretrained(checkpoint)
    policy.eval()
    config = policy.config
    preprocessor, _ = make_pre_post_processors(
        policy_cfg=config,
        pretrained_path=checkpoint,
        preprocessor_overrides={"device_processor": {"device": "cpu"}},
    )
    suffix_length = policy.model.action_expert.suffix_length
    generator = torch.Generator().manual_seed(seed)
    own_losses, swapped_losses, colour_share, uniform_share = [], [], [], []
    for start in range(0, len(samples.indices), batch_size):
        items = [dataset[index] for index in samples.indices[start : start + batch_size]]
        batch = default_collate(items)
        swapped_batch = {**batch, "task": samples.swapped_tasks[start : start + batch_size]}
        noise_shape = (len(items), config.chunk_size, config.max_action_dim)
        noise = torch.randn(noise_shape, generator=generator)
        time = torch.rand(len(items), generator=generator) * 0.999 + 0.001
        own = preprocessor(batch)
        swapped = preprocessor(swapped_batch)
        records: list[torch.Tensor] = []
        with recorded_suffix_attention(suffix_length, records):
            own_loss, _ = policy.forward(own, noise=noise, time=time, reduction="none")
        swapped_loss, _ = policy.forward(swapped, noise=noise, time=time, reduction="none")
        own_losses.append(own_loss)
        swapped_losses.append(swapped_loss)
        tokens = own[OBS_LANGUAGE_TOKENS]
        colour = colour_key_positions(tokens, swapped[OBS_LANGUAGE_TOKENS])
        # Keys: [prefix: image tokens, task tokens][suffix]; every layer has the same keys and mask.
        colour_key = records[0].shape[-1] - suffix_length - tokens.shape[1] + colour  # (B,)
        rows = torch.arange(len(items))
        keys_seen = (records[0][:, -1] > 0).sum(-1)  # unmasked keys of the last action query, (B,)
        per_layer = [
            probabilities[rows, :, colour_key].mean(1) for probabilities in records
        ]  # (B, Ls, Lk) each
        colour_share.append(torch.stack(per_layer, 1))  # (B, layers)
        uniform_share.append((1.0 / keys_seen.float())[:, None].expand(-1, len(records)))
    own_loss, swapped_loss = torch.cat(own_losses), torch.cat(swapped_losses)
    first = torch.from_numpy(samples.first_frame)
    return {
        "loss_first_frames": own_loss[first].mean().item(),
        "loss_first_frames_colour_swapped": swapped_loss[first].mean().item(),
        "loss_later_frames": own_loss[~first].mean().item(),
        "loss_later_frames_colour_swapped": swapped_loss[~first].mean().item(),
        "loss_by_frames_to_end": losses_by_frames_to_end(samples.frames_to_end, own_loss, swapped_loss),
        "expert_attention_on_colour_per_layer": torch.cat(colour_share).mean(0).tolist(),
        "uniform_attention_per_layer": torch.cat(uniform_share).mean(0).tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="a demo run folder (holds train_<name>/)")
    parser.add_argument("--dataset-root", type=Path, help="its training set (needed to probe checkpoints)")
    parser.add_argument("--name", default="depth", help="the trained policy's name (train_<name>)")
    parser.add_argument("--num-blocks", type=int, default=3)
    parser.add_argument("--samples-per-group", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--exit-loss", type=float, default=DEFAULT_EXIT_LOSS)
    parser.add_argument("--colour-bound-ratio", type=float, default=DEFAULT_COLOUR_BOUND_RATIO)
    parser.add_argument("--seed", type=int, default=0, help="sample choice, noise and flow time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    train_dir = args.run_dir / f"train_{args.name}"
    checkpoints = training_checkpoints(train_dir)
    if not checkpoints:
        raise SystemExit(f"no checkpoint under {train_dir / 'checkpoints'}")
    train_config = json.loads((checkpoints[-1][1] / "train_config.json").read_text())
    losses = logged_losses(args.run_dir / f"train_{args.name}.log", train_config["log_freq"])
    exit_step = plateau_exit(losses, args.exit_loss)
    batch = train_config["batch_size"]
    summary = {
        "exit_loss": args.exit_loss,
        "plateau_exit_step": exit_step,
        "plateau_exit_samples": None if exit_step is None else exit_step * batch,
        "logged_losses": losses,
        "checkpoints": {},
    }
    print(
        f"plateau exit (logged loss below {args.exit_loss} from then on): step {exit_step}, "
        f"{'-' if exit_step is None else exit_step * batch} samples"
    )
    if args.dataset_root is not None:
        chunk = train_config["policy"]["chunk_size"]
        dataset = LeRobotDataset(
            "local/touch_block",
            root=args.dataset_root,
            delta_timestamps={"action": [step / touch_block.FPS for step in range(chunk)]},
            depth_output_unit=train_config["dataset"]["depth_output_unit"],  # as the run was trained
        )
        samples = probe_samples(dataset, args.num_blocks, args.samples_per_group, args.seed)
        logged = dict(losses)
        rows = []
        for step, checkpoint in tqdm(checkpoints, desc="checkpoints", unit="ckpt"):
            probe = probe_checkpoint(checkpoint, dataset, samples, args.batch_size, args.seed)
            summary["checkpoints"][step] = probe
            rows.append(
                [
                    step,
                    step * batch,
                    logged.get(step, float("nan")),
                    probe["loss_first_frames"],
                    probe["loss_first_frames_colour_swapped"],
                    probe["loss_later_frames"],
                    probe["loss_later_frames_colour_swapped"],
                    " ".join(
                        f"{share / uniform:.1f}"
                        for share, uniform in zip(
                            probe["expert_attention_on_colour_per_layer"],
                            probe["uniform_attention_per_layer"],
                        )
                    ),
                ]
            )
        print_table(
            "colour word over training (losses: fixed noise and time; attention: x a uniform share, per layer)",
            [
                "step",
                "samples",
                "logged loss",
                "first frames",
                "swapped",
                "later frames",
                "swapped",
                "attention",
            ],
            rows,
        )
        labels = [frames_to_end_label(*group) for group in FRAMES_TO_END_GROUPS]
        print_table(
            "loss by frames to the episode's end: own / swapped colour word",
            ["step", *labels],
            [
                [
                    step,
                    *(
                        "{loss:.3f} / {loss_colour_swapped:.3f}".format(
                            **probe["loss_by_frames_to_end"][label]
                        )
                        if label in probe["loss_by_frames_to_end"]
                        else "-"
                        for label in labels
                    ),
                ]
                for step, probe in summary["checkpoints"].items()
            ],
        )
        bound_step = colour_bound_step(summary["checkpoints"], args.colour_bound_ratio)
        summary["colour_bound_ratio"] = args.colour_bound_ratio
        summary["colour_bound_step"] = bound_step
        summary["colour_bound_samples"] = None if bound_step is None else bound_step * batch
        print(
            f"colour word bound (swapped colour >= {args.colour_bound_ratio:g} x own loss on first frames from "
            f"then on): step {bound_step}, {summary['colour_bound_samples'] or '-'} samples"
        )
    write_json(args.run_dir / "plateau.json", summary)


if __name__ == "__main__":
    main()
