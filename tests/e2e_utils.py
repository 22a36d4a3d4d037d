"""Helpers of the end-to-end tests (`test_lerobot_scripts.py`): run LeRobot's unmodified scripts in
subprocesses, parse their logs, and build untrained llava3d_fusion checkpoints for a given env.

Everything here is offline and CPU-only: the policies use the tiny random backbone
(``vlm_model_name="tiny"``), subprocesses get ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lerobot.configs import FeatureType, PolicyFeature

from lerobot_llava3d_fusion.envs.configs import touch_block_eval_observation

REPO_ROOT = Path(__file__).resolve().parent.parent

# One `logging.info(train_tracker)` line of lerobot-train, e.g.
# "... step:40 smpl:320 ep:20 epch:6.67 loss:1.677 grdn:2.760 lr:3.0e-05 ..."
_TRAIN_LOG_LINE = re.compile(r"\bstep:(\d+[KMBTQ]?)\b.*?\bloss:([-+0-9.eE]+|nan|inf)")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of the script subprocesses: offline, headless rendering, one thread per op.

    `OMP_NUM_THREADS=1` keeps the tiny model from fighting other processes for the few cores;
    `PYTHONUNBUFFERED` makes a killed (timed-out) run still leave its log behind.
    """
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class ScriptResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def error_message(self) -> str:
        """The text after the last traceback on stderr (the exception that ended the script)."""
        _, _, tail = self.stderr.rpartition("Traceback (most recent call last):")
        lines = [line for line in tail.splitlines() if line and not line.startswith((" ", "\t"))]
        return "\n".join(lines)

    def describe(self, tail: int = 6000) -> str:
        return (
            f"$ {' '.join(map(str, self.args))}\n(exit {self.returncode}, {self.seconds:.0f}s)\n"
            f"--- stdout (end) ---\n{self.stdout[-tail // 2 :]}\n--- stderr (end) ---\n{self.stderr[-tail:]}"
        )


def run_command(command: list[str], log_path: Path, timeout: float = 300) -> ScriptResult:
    """Run `command` (a Python subprocess) with `subprocess_env()`; stdout/stderr saved next to `log_path`.

    The command runs in its own process group with Python's fault handler on: past `timeout`, every
    process of the group gets SIGABRT first, so each prints where it was stuck (the stack of every
    thread) into the captured stderr, and is then killed."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(PYTHONFAULTHANDLER="1"),
        cwd=log_path.parent,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=20)  # reads the stacks while they are printed
        _signal_group(process.pid, signal.SIGKILL)  # whatever of the group still runs
        stdout, stderr = process.communicate()  # everything read so far, once the pipes close
        returncode = -9
        stderr += f"\n[test harness] timed out after {timeout}s (stacks above: SIGABRT to every process)"
    log_path.write_text(
        f"$ {' '.join(map(str, command))}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    )
    return ScriptResult([str(c) for c in command], returncode, stdout, stderr, time.perf_counter() - start)


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # every process of the group has ended
        os.killpg(group, signum)


def run_module(module: str, args: list[str], log_path: Path, timeout: float = 300) -> ScriptResult:
    """`python -m <module> <args>` in a subprocess."""
    return run_command([sys.executable, "-m", module, *args], log_path, timeout=timeout)


def run_lerobot(script: str, args: list[str], log_path: Path, timeout: float = 300) -> ScriptResult:
    """One of LeRobot's unmodified command-line scripts, e.g. `run_lerobot("lerobot_train", [...])`."""
    return run_module(f"lerobot.scripts.{script}", args, log_path, timeout=timeout)


def parse_train_losses(log: str) -> list[tuple[int, float]]:
    """(step, loss) of every metrics line lerobot-train logged (one per `--log_freq` steps)."""
    losses = []
    for match in _TRAIN_LOG_LINE.finditer(log):
        step = match.group(1)
        if not step.isdigit():  # format_big_number abbreviates >= 1000; tests stay below that
            continue
        losses.append((int(step), float(match.group(2))))
    return losses


def loss_decreased(losses: list[tuple[int, float]], window: int = 3, factor: float = 0.8) -> bool:
    """Mean of the last `window` logged losses below `factor` x the mean of the first `window`.

    Flow-matching losses are noisy (random time and noise per sample), hence windows, not endpoints.
    """
    values = [loss for _, loss in losses]
    first = sum(values[:window]) / window
    last = sum(values[-window:]) / window
    return last < factor * first


def train_args(
    dataset_repo_id: str,
    dataset_root: Path,
    output_dir: Path,
    steps: int,
    *,
    log_freq: int = 5,
    batch_size: int = 8,
    lr: float = 3e-3,
    chunk_size: int = 4,
    extra: list[str] = (),
) -> list[str]:
    """lerobot-train arguments of a short CPU run of the tiny llava3d_fusion on a local dataset."""
    return [
        f"--dataset.repo_id={dataset_repo_id}",
        f"--dataset.root={dataset_root}",
        "--dataset.depth_output_unit=m",  # depth maps in metres, as the policy reads them
        "--policy.type=llava3d_fusion",
        "--policy.vlm_model_name=tiny",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        f"--policy.chunk_size={chunk_size}",
        f"--policy.n_action_steps={chunk_size}",
        "--policy.num_steps=2",
        f"--policy.optimizer_lr={lr}",
        "--policy.optimizer_weight_decay=0",
        "--policy.scheduler_warmup_steps=2",
        f"--policy.scheduler_decay_steps={steps}",
        f"--policy.scheduler_decay_lr={lr / 10}",
        f"--batch_size={batch_size}",
        f"--steps={steps}",
        f"--log_freq={log_freq}",
        f"--save_freq={steps}",
        "--num_workers=0",
        "--env_eval_freq=0",
        "--seed=1000",
        f"--output_dir={output_dir}",
        "--wandb.enable=false",
        *extra,
    ]


def last_checkpoint(output_dir: Path) -> Path:
    """`<output_dir>/checkpoints/last/pretrained_model` of a lerobot-train run."""
    return output_dir / "checkpoints" / "last" / "pretrained_model"


# ---- Untrained checkpoints for an env ---------------------------------------------------------------


def libero_features(
    size: int,
    depth: bool = False,
    cameras: tuple[str, ...] = ("image", "image2"),
    state_dim: int = 8,
    action_dim: int = 7,
) -> tuple[dict[str, PolicyFeature], dict[str, PolicyFeature]]:
    """(input_features, output_features) as a policy trained on a LIBERO(-RGBD) dataset has them."""
    inputs: dict[str, PolicyFeature] = {}
    for camera in cameras:
        inputs[f"observation.images.{camera}"] = PolicyFeature(FeatureType.VISUAL, (3, size, size))
        if depth:
            inputs[f"observation.depth.{camera}"] = PolicyFeature(FeatureType.STATE, (1, size, size))
            inputs[f"observation.intrinsics.{camera}"] = PolicyFeature(FeatureType.STATE, (3, 3))
            inputs[f"observation.extrinsics.{camera}"] = PolicyFeature(FeatureType.STATE, (4, 4))
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (state_dim,))
    return inputs, {"action": PolicyFeature(FeatureType.ACTION, (action_dim,))}


def plausible_stats(state_dim: int, action_dim: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Dataset stats of the kind `meta/stats.json` holds (state and action; images stay IDENTITY)."""
    generator = torch.Generator().manual_seed(seed)

    def stats(dim: int, scale: float) -> dict[str, torch.Tensor]:
        mean = torch.randn(dim, generator=generator) * 0.1 * scale
        std = torch.rand(dim, generator=generator) * 0.5 * scale + 0.1 * scale
        return {
            "mean": mean, "std": std, "min": mean - 3 * std, "max": mean + 3 * std,
            "q01": mean - 2.3 * std, "q99": mean + 2.3 * std, "count": torch.tensor([1000]),
        }  # fmt: skip

    return {"observation.state": stats(state_dim, 1.0), "action": stats(action_dim, 0.5)}


def save_untrained_checkpoint(
    directory: Path,
    input_features: dict[str, PolicyFeature],
    output_features: dict[str, PolicyFeature],
    seed: int = 0,
    **config_overrides,
) -> Path:
    """A llava3d_fusion checkpoint (config, weights, both processor pipelines) without training.

    Written the way lerobot-train writes `pretrained_model/`: `policy.save_pretrained` then the
    pipelines' `save_pretrained`, which name their files after the pipeline (`policy_preprocessor.json`,
    `policy_postprocessor.json` and the normalizer state files), where lerobot-eval looks for them.
    """
    from lerobot_llava3d_fusion import Llava3DFusionConfig, make_llava3d_fusion_pre_post_processors
    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

    fields = dict(
        vlm_model_name="tiny",
        load_vlm_weights=False,
        chunk_size=4,
        n_action_steps=4,
        num_steps=2,
        max_state_dim=8,
        max_action_dim=8,
        device="cpu",
        push_to_hub=False,
        input_features=input_features,
        output_features=output_features,
    )
    fields.update(config_overrides)
    config = Llava3DFusionConfig(**fields)
    torch.manual_seed(seed)
    policy = Llava3DFusionPolicy(config)
    policy.save_pretrained(directory)
    state_dim = input_features["observation.state"].shape[-1] if "observation.state" in input_features else 0
    stats = plausible_stats(state_dim, output_features["action"].shape[-1], seed)
    if not state_dim:
        del stats["observation.state"]
    preprocessor, postprocessor = make_llava3d_fusion_pre_post_processors(config, dataset_stats=stats)
    preprocessor.save_pretrained(directory)
    postprocessor.save_pretrained(directory)
    return directory


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- Loading a checkpoint the way lerobot-eval does ------------------------------------------------


def touch_block_observation(height: int, width: int, seed: int = 0) -> dict:
    """One observation of the touch_block env at `height` x `width`, as lerobot-eval's rollout hands
    it to the policy preprocessor."""
    return touch_block_eval_observation(seed, observation_height=height, observation_width=width)


def predict_like_lerobot_eval(
    checkpoint: Path, env_type: str, env_kwargs: dict, observation: dict, noise: torch.Tensor, init_seed: int
) -> dict[str, torch.Tensor]:
    """Load `checkpoint` as lerobot-eval does (`PreTrainedConfig.from_pretrained`, `make_policy` with the
    env config, `make_pre_post_processors` from the pretrained path) and act on `observation`.

    `init_seed` seeds the RNG before the policy is built: whatever the checkpoint does not restore
    would differ between two calls with different seeds.

    Returns:
        {"chunk": (B, chunk_size, action_dim), "action": (B, action_dim)}, both postprocessed.
    """
    from lerobot.configs import PreTrainedConfig
    from lerobot.envs.factory import make_env_config
    from lerobot.policies import make_policy, make_pre_post_processors

    cfg = PreTrainedConfig.from_pretrained(checkpoint)
    cfg.pretrained_path = Path(checkpoint)
    cfg.device = "cpu"
    torch.manual_seed(init_seed)
    policy = make_policy(cfg=cfg, env_cfg=make_env_config(env_type, **env_kwargs))
    policy.eval()
    preprocessor, postprocessor = make_pre_post_processors(
        policy_cfg=cfg,
        pretrained_path=cfg.pretrained_path,
        preprocessor_overrides={
            "device_processor": {"device": "cpu"},
            "rename_observations_processor": {"rename_map": {}},
        },
    )
    batch = preprocessor(
        {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in observation.items()}
    )
    with torch.inference_mode():
        chunk = policy.predict_action_chunk(batch, noise=noise)
        policy.reset()
        action = policy.select_action(batch, noise=noise)
    return {"chunk": postprocessor(chunk), "action": postprocessor(action)}


# ---- Capturing what a Hub push would upload -----------------------------------------------------------


def hub_capture_patches(capture_dir: Path) -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) triples that make Hub pushes write to `capture_dir` instead.

    `HfApi.create_repo` and `HfApi.upload_folder` are the two network calls of LeRobot's pushes
    (`PreTrainedPolicy.push_model_to_hub`, `HubMixin.push_to_hub` of the processor pipelines);
    `RepoCard.validate` posts the model card to the Hub's validator. Uploaded files (after the
    call's allow/ignore patterns) accumulate in `capture_dir/repos/<repo_id>/` as they would in the
    repo; every call is appended to `capture_dir/calls.jsonl`.
    """
    import shutil
    from types import SimpleNamespace

    from huggingface_hub import HfApi, RepoCard
    from huggingface_hub.utils import filter_repo_objects

    capture_dir = Path(capture_dir)
    capture_dir.mkdir(parents=True, exist_ok=True)

    def record(call: dict) -> None:
        with open(capture_dir / "calls.jsonl", "a") as f:
            f.write(json.dumps(call, default=str) + "\n")

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        record({"call": "create_repo", "repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        kept = list(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        target = capture_dir / "repos" / repo_id
        for name in kept:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, target / name)
        record(
            {
                "call": "upload_folder",
                "repo_id": repo_id,
                "files": kept,
                "repo_type": kwargs.get("repo_type"),
                "commit_message": kwargs.get("commit_message"),
            }
        )
        url = SimpleNamespace(url=f"https://huggingface.co/{repo_id}", repo_id=repo_id)
        return SimpleNamespace(repo_url=url, commit_url=f"{url.url}/commit/0", oid="0")

    def validate(self, repo_type=None):
        record({"call": "validate_card", "repo_type": repo_type or self.repo_type, "content": str(self)})

    return [(HfApi, "create_repo", create_repo), (HfApi, "upload_folder", upload_folder),
            (RepoCard, "validate", validate)]  # fmt: skip


def read_calls(capture_dir: Path) -> list[dict]:
    path = Path(capture_dir) / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- Subprocess entry points ------------------------------------------------------------------------


def _main(argv: list[str]) -> None:
    """`python tests/e2e_utils.py predict ...` / `... train-capturing-hub CAPTURE_DIR <train args>`."""
    import argparse

    if argv and argv[0] == "train-capturing-hub":
        # lerobot-train, unmodified, with only the Hub's network calls replaced.
        for owner, name, replacement in hub_capture_patches(Path(argv[1])):
            setattr(owner, name, replacement)
        from lerobot.scripts.lerobot_train import main as train_main

        sys.argv = ["lerobot-train", *argv[2:]]
        train_main()
        return

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["predict"])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--env-type", required=True)
    parser.add_argument("--env-kwargs", type=json.loads, default={})
    parser.add_argument("--inputs", type=Path, required=True, help="torch.save'd {'observation', 'noise'}")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--init-seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    inputs = torch.load(args.inputs, weights_only=True)
    import lerobot_llava3d_fusion  # noqa: F401  (what lerobot's plugin discovery does in the scripts)

    out = predict_like_lerobot_eval(
        args.checkpoint,
        args.env_type,
        args.env_kwargs,
        inputs["observation"],
        inputs["noise"],
        args.init_seed,
    )
    torch.save(out, args.output)


if __name__ == "__main__":
    _main(sys.argv[1:])
