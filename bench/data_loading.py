"""Data loading of the touch-block demo: where LeRobot's map-style reader spends a sample's time.

Builds a small touch-block dataset with the demo's writer (in a temporary directory) and times
`LeRobotDataset.__getitem__` with the demo's `delta_timestamps` (an action chunk of the preset's
`chunk_size`), interleaved over three readers so that other jobs on the machine load them alike:

- `images`: the demo's layout (PNG RGB, TIFF depth) read by LeRobot as installed;
- `lossless video`: RGB stored as lossless HEVC video (planar RGB, bit-exact), depth as TIFF,
  decoded with the preset's `pyav` backend;
- `RGB and depth video`: the depth map too as LeRobot's depth video (its encoder's 12-bit logarithmic
  codes between 0.5 and 1.5 m, the scenes' depths being 0.69-1.0 m, HEVC lossless over those codes),
  so that the dataset holds no image column and the action-chunk query decodes no image; depth then
  differs from the TIFF by the quantisation (the script checks the bound and reports the largest
  difference), everything else is equal;
- `images, queried columns`: the demo's layout read with the reader change proposed in
  docs/upstream_dataset_reader.md (a delta-timestamp query formats only the queried column),
  applied here by replacing `DatasetReader._query_hf_dataset` for the measurement only;
- `images, selected rows`: the same replacement as the pull requests for lerobot#2895 write it (the
  rows picked with `Dataset.select(indices)`, then the column read from them).

The profile counts the image decodes of one sample and splits its time into the current row
(`hf_dataset[idx]`), the action-chunk query and the rest. With `--train-steps N`, short
`lerobot-train` runs with the demo's preset alternate `--train-repeats` times: as installed with the
demo's one compute thread, then with the proposed reader (given to every process, spawned DataLoader
workers included, through a `sitecustomize` on PYTHONPATH) with one and with two compute threads;
samples/s come from their logs (`batch / (updt_s + data_s)`).

    .venv/bin/python bench/data_loading.py                  # reader only (~1 min on 2 cores)
    .venv/bin/python bench/data_loading.py --train-steps 40 # plus lerobot-train (~5 min)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import datasets
import torch
from datasets.features.image import Image
from lerobot.configs.video import DEPTH_QMAX, DepthEncoderConfig, RGBEncoderConfig
from lerobot.datasets import LeRobotDataset
from lerobot.datasets.dataset_reader import DatasetReader

from common import REPO_ROOT, print_table, summarize, time_interleaved, write_json
from lerobot_llava3d_fusion.demo import make_touch_block_dataset as writer
from lerobot_llava3d_fusion.demo.touch_block_demo import PRESET, PRESET_CONFIG, write_demo_backbone
from lerobot_llava3d_fusion.envs import touch_block

CHUNK_SIZE = PRESET_CONFIG["policy"]["chunk_size"]
DELTA_TIMESTAMPS = {"action": [step / touch_block.FPS for step in range(CHUNK_SIZE)]}
# Bit-exact RGB video: HEVC lossless over planar RGB (no YUV conversion).
LOSSLESS_RGB_VIDEO = RGBEncoderConfig(
    vcodec="hevc", pix_fmt="gbrp", crf=None, extra_options={"x265-params": "lossless=1:log-level=error"}
)
# LeRobot's depth video: DEPTH_QMAX + 1 codes, logarithmic in depth + shift over [0.5, 1.5] m, stored
# losslessly.
DEPTH_VIDEO = DepthEncoderConfig(
    depth_min=0.5, depth_max=1.5, extra_options={"x265-params": "lossless=1:log-level=error"}
)
DEPTH_KEY = "observation.depth.top"
# One code's step at depth_max (the widest): twice the largest rounding error of the quantisation.
DEPTH_VIDEO_TOLERANCE_M = (
    (DEPTH_VIDEO.depth_max + DEPTH_VIDEO.shift)
    * math.log((DEPTH_VIDEO.depth_max + DEPTH_VIDEO.shift) / (DEPTH_VIDEO.depth_min + DEPTH_VIDEO.shift))
    / DEPTH_QMAX
)
STEP_LOG = re.compile(r"step:(\S+) .*updt_s:([\d.]+) data_s:([\d.]+)")


def query_non_video_keys(reader: DatasetReader, query_indices: dict[str, list[int]], read_column) -> dict:
    """The part of `DatasetReader._query_hf_dataset` that every variant shares: each non-video key's
    rows, at the dataset's own row indices, read by `read_column(hf_dataset, key, indices)` (a list
    of tensors) and stacked."""
    result = {}
    for key, indices in query_indices.items():
        if key in reader._meta.video_keys:
            continue
        if reader._absolute_to_relative_idx is not None:
            indices = [reader._absolute_to_relative_idx[index] for index in indices]
        result[key] = torch.stack(read_column(reader.hf_dataset, key, indices))
    return result


def query_only_queried_columns(self: DatasetReader, query_indices: dict[str, list[int]]) -> dict:
    """The proposed `DatasetReader._query_hf_dataset`: each non-video key's rows are formatted from
    that column alone (its transform and image decoding run on that column only)."""
    return query_non_video_keys(
        self, query_indices, lambda rows, key, indices: rows.select_columns([key])[indices][key]
    )


def query_selected_rows(self: DatasetReader, query_indices: dict[str, list[int]]) -> dict:
    """`DatasetReader._query_hf_dataset` as the pull requests for lerobot#2895 write it: the rows
    picked with `Dataset.select(indices)`, then each key's column read from them (formatting those
    rows whole, images included)."""
    return query_non_video_keys(self, query_indices, lambda rows, key, indices: rows.select(indices)[:][key])


@contextlib.contextmanager
def reader_query(query=None) -> Iterator[None]:
    """LeRobot's reader with `query` as its `_query_hf_dataset` (None: as installed)."""
    if query is None:
        yield
        return
    with mock.patch.object(DatasetReader, "_query_hf_dataset", query):
        yield


def write_dataset(
    root: Path, episodes: int, seed: int, lossless_video: bool, depth_video: bool = False
) -> Path:
    """The demo's dataset; `lossless_video`: RGB as lossless video; `depth_video` too: depth as
    LeRobot's depth video (`DEPTH_VIDEO`)."""
    create = LeRobotDataset.create
    encoders = {"rgb_encoder": LOSSLESS_RGB_VIDEO} if lossless_video else {}
    dataset_features = writer.dataset_features
    if depth_video:
        if not lossless_video:
            raise ValueError("depth_video needs lossless_video (LeRobot encodes a dataset's videos alike)")
        encoders["depth_encoder"] = DEPTH_VIDEO

    def features(*args, **kwargs):
        spec = dataset_features(*args, **kwargs)
        if depth_video:
            spec[DEPTH_KEY] = {**spec[DEPTH_KEY], "dtype": "video"}
        return spec

    with (
        mock.patch.object(writer.LeRobotDataset, "create", lambda *a, **k: create(*a, **encoders, **k)),
        mock.patch.object(writer, "dataset_features", features),
    ):
        writer.make_touch_block_dataset(root, "local/touch_block", episodes, seed, use_videos=lossless_video)
    return root


def open_dataset(root: Path) -> LeRobotDataset:
    """The dataset as lerobot-train opens it with the demo's preset."""
    dataset_options = PRESET_CONFIG["dataset"]
    return LeRobotDataset(
        "local/touch_block",
        root=root,
        delta_timestamps=DELTA_TIMESTAMPS,
        video_backend=dataset_options["video_backend"],
        depth_output_unit=dataset_options["depth_output_unit"],
        return_uint8=True,  # as lerobot-train's dataset factory
    )


def read_all(dataset: LeRobotDataset, indices: list[int], query=None):
    """One pass over `indices`, with `query` as the reader's `_query_hf_dataset` (None: LeRobot's)."""

    def call() -> None:
        with reader_query(query):
            for index in indices:
                dataset[index]

    return call


def check_same_samples(
    reference: LeRobotDataset,
    other: LeRobotDataset,
    indices: list[int],
    query=None,
    depth_tolerance: float = 0.0,
) -> float:
    """Every tensor of `other`'s samples equals `reference`'s (the bench compares like with like), the
    depth map within `depth_tolerance` metres (`other` read with `query` as its `_query_hf_dataset`);
    returns the largest depth difference."""
    largest_depth_difference = 0.0
    for index in indices:
        expected = reference[index]
        with reader_query(query):
            actual = other[index]
        for key, value in expected.items():
            if not isinstance(value, torch.Tensor):
                continue
            if actual[key].dtype == torch.uint8 and value.is_floating_point():  # video frames
                actual[key] = actual[key] / 255
            if key == DEPTH_KEY and depth_tolerance > 0:
                difference = (value - actual[key]).abs().max().item()
                largest_depth_difference = max(largest_depth_difference, difference)
                if difference > depth_tolerance:
                    raise AssertionError(
                        f"sample {index}: depth differs by {difference} m > {depth_tolerance} m"
                    )
            elif not torch.equal(value, actual[key]):
                raise AssertionError(f"sample {index}: {key} differs between readers")
    return largest_depth_difference


def profile_sample(dataset: LeRobotDataset, indices: list[int]) -> dict:
    """Image decodes per sample and the time of each part of `get_item`: the current row
    (`hf_dataset[idx]`), the action-chunk query (`_query_hf_dataset`) and the rest."""
    reader = dataset.reader
    decodes: Counter = Counter()
    phase_time: Counter = Counter()
    phase = "rest"
    decode_example = Image.decode_example
    dataset_getitem = datasets.Dataset.__getitem__

    def counting_decode(self, value, token_per_repo_id=None):
        decodes[phase] += 1
        return decode_example(self, value, token_per_repo_id)

    def timed(name, function, only_from_rest=False):
        def wrapper(*args, **kwargs):
            nonlocal phase
            if only_from_rest and phase != "rest":
                return function(*args, **kwargs)
            outer, phase = phase, name
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phase_time[name] += time.perf_counter() - start
                phase = outer

        return wrapper

    with (
        mock.patch.object(Image, "decode_example", counting_decode),
        mock.patch.object(datasets.Dataset, "__getitem__", timed("current row", dataset_getitem, True)),
        mock.patch.object(reader, "_query_hf_dataset", timed("action-chunk query", reader._query_hf_dataset)),
    ):
        start = time.perf_counter()
        for index in indices:
            dataset[index]
        phase_time["rest"] = time.perf_counter() - start - sum(phase_time.values())
    return {
        "image_decodes_per_sample": {name: decodes[name] / len(indices) for name in phase_time},
        "image_columns": sorted(dataset.meta.camera_keys),
        "seconds_per_sample": {name: seconds / len(indices) for name, seconds in phase_time.items()},
    }


# Put on PYTHONPATH, it gives every process of a lerobot-train run the proposed reader: the main
# process and its DataLoader workers, which lerobot-train starts with "spawn" (fresh interpreters).
PROPOSED_READER_SITECUSTOMIZE = f"""\
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from data_loading import DatasetReader, query_only_queried_columns
DatasetReader._query_hf_dataset = query_only_queried_columns
"""


def train_command(dataset_root: Path, backbone: Path, output_dir: Path, steps: int) -> list[str]:
    """A short lerobot-train run with the demo's preset, unmodified."""
    return [
        sys.executable,
        "-m",
        "lerobot.scripts.lerobot_train",
        f"--config_path={PRESET}",
        f"--dataset.root={dataset_root}",
        f"--policy.vlm_model_name={backbone}",
        f"--steps={steps}",
        "--log_freq=5",
        f"--save_freq={steps}",
        "--save_checkpoint=false",
        f"--output_dir={output_dir}",
    ]


def train_step_times(command: list[str], environment: dict[str, str]) -> dict[str, float]:
    """Mean `updt_s` (the model's step) and `data_s` (waiting for the DataLoader) of one
    lerobot-train run, its first log line (warm-up) left out, and its samples/s:
    batch / (updt_s + data_s)."""
    output = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if output.returncode != 0:
        raise RuntimeError(f"lerobot-train failed:\n{output.stdout[-3000:]}{output.stderr[-3000:]}")
    steps = [(float(u), float(d)) for _, u, d in STEP_LOG.findall(output.stdout + output.stderr)][1:]
    if not steps:
        raise RuntimeError("lerobot-train logged fewer than 2 step lines; raise --train-steps")
    update = sum(u for u, _ in steps) / len(steps)
    data = sum(d for _, d in steps) / len(steps)
    return {"updt_s": update, "data_s": data, "samples_per_s": PRESET_CONFIG["batch_size"] / (update + data)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=8, help="touch-block episodes in the dataset")
    parser.add_argument("--samples", type=int, default=64, help="samples read per timed pass")
    parser.add_argument("--reps", type=int, default=5, help="timed passes per reader (interleaved)")
    parser.add_argument("--train-steps", type=int, default=0, help="steps per lerobot-train run (0: none)")
    parser.add_argument("--train-repeats", type=int, default=2, help="lerobot-train runs per reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "bench" / "data_loading.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(temporary)
        images = open_dataset(write_dataset(workdir / "images", args.episodes, args.seed, False))
        video = open_dataset(write_dataset(workdir / "video", args.episodes, args.seed, True))
        all_video = open_dataset(write_dataset(workdir / "all_video", args.episodes, args.seed, True, True))
        indices = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
        indices = indices[: args.samples].tolist()
        check_same_samples(images, video, indices[:8])
        check_same_samples(images, images, indices[:8], query=query_only_queried_columns)
        check_same_samples(images, images, indices[:8], query=query_selected_rows)
        depth_video_error = check_same_samples(
            images, all_video, indices[:8], depth_tolerance=DEPTH_VIDEO_TOLERANCE_M
        )

        profile = profile_sample(images, indices)
        action_query_decodes = {}
        for name, query in (
            ("queried columns", query_only_queried_columns),
            ("selected rows", query_selected_rows),
        ):
            with reader_query(query):
                decodes = profile_sample(images, indices[:8])["image_decodes_per_sample"]
            action_query_decodes[name] = decodes["action-chunk query"]
        times = time_interleaved(
            {
                "images": read_all(images, indices),
                "lossless video": read_all(video, indices),
                "RGB and depth video": read_all(all_video, indices),
                "images, queried columns": read_all(images, indices, query_only_queried_columns),
                "images, selected rows": read_all(images, indices, query_selected_rows),
            },
            warmup=1,
            reps=args.reps,
            device=torch.device("cpu"),
        )
        reader = {name: summarize([t / len(indices) for t in samples]) for name, samples in times.items()}
        baseline = reader["images"]["median"]
        rows = [
            [name, f"{1e3 * s['median']:.2f}", f"{1 / s['median']:.0f}", f"{baseline / s['median']:.2f}"]
            for name, s in reader.items()
        ]

        training = {}
        if args.train_steps:
            backbone = write_demo_backbone(workdir / "backbone")
            # (reader patched, torch compute threads): the demo's 2 cores, 2 workers, 1 compute
            # thread; then the proposed reader with the same threads, and with both cores computing.
            runs = {
                "as installed, 1": (False, 1),
                "queried columns, 1": (True, 1),
                "queried columns, 2": (True, 2),
            }
            proposed_site = workdir / "proposed_reader_site"
            proposed_site.mkdir()
            (proposed_site / "sitecustomize.py").write_text(PROPOSED_READER_SITECUSTOMIZE)
            measured = {name: [] for name in runs}
            for repeat in range(args.train_repeats):
                for run_index, (name, (patched, threads)) in enumerate(runs.items()):
                    command = train_command(
                        images.root, backbone, workdir / f"train_{run_index}_{repeat}", args.train_steps
                    )
                    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                    if patched:
                        environment["PYTHONPATH"] = os.pathsep.join(
                            filter(None, [str(proposed_site), os.environ.get("PYTHONPATH")])
                        )
                    measured[name].append(train_step_times(command, environment))
            training = {
                name: {field: summarize([run[field] for run in values]) for field in values[0]}
                for name, values in measured.items()
            }

    decodes = profile["image_decodes_per_sample"]
    print(f"data_loading | {args.episodes} episodes, chunk {CHUNK_SIZE} | cpu load {os.getloadavg()[0]:.1f}")
    print_table(
        "image decodes per sample (columns: " + ", ".join(profile["image_columns"]) + ")",
        ["part of get_item", "decodes", "ms / sample"],
        [
            [name, f"{decodes.get(name, 0):.1f}", f"{1e3 * seconds:.2f}"]
            for name, seconds in profile["seconds_per_sample"].items()
        ],
    )
    print(
        "image decodes per sample in the action-chunk query, other queries: "
        + ", ".join(f"{name} {count:.1f}" for name, count in action_query_decodes.items())
    )
    print(f"depth video: largest depth difference to the TIFF {1e3 * depth_video_error:.3f} mm")
    print_table(
        "LeRobotDataset.__getitem__ (interleaved)", ["reader", "ms / sample", "samples/s", "speed-up"], rows
    )
    if training:
        base = training["as installed, 1"]["samples_per_s"]["median"]
        print_table(
            f"lerobot-train, demo preset, {args.train_steps} steps x {args.train_repeats} (alternating)",
            ["reader, compute threads", "updt_s", "data_s", "samples/s", "speed-up"],
            [
                [
                    name,
                    f"{run['updt_s']['median']:.3f}",
                    f"{run['data_s']['median']:.3f}",
                    f"{run['samples_per_s']['median']:.1f}",
                    f"{run['samples_per_s']['median'] / base:.2f}",
                ]
                for name, run in training.items()
            ],
        )
    write_json(
        args.out,
        {
            "episodes": args.episodes,
            "chunk_size": CHUNK_SIZE,
            "profile": profile,
            "action_query_decodes_per_sample": action_query_decodes,
            "reader": reader,
            "depth_video_largest_error_m": depth_video_error,
            "train_steps": args.train_steps,
            "training_samples_per_s": training,
        },
    )


if __name__ == "__main__":
    main()
