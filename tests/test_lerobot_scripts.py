"""End to end through LeRobot's UNMODIFIED command-line scripts, as a user runs them.

`lerobot_train` / `lerobot_eval` run in subprocesses (`python -m lerobot.scripts.<script>`), offline
(`HF_HUB_OFFLINE=1`), on the CPU, with the tiny random backbone (`--policy.vlm_model_name=tiny`), so
everything LeRobot does around the policy is exercised: plugin discovery, draccus parsing of the
`--policy.*` flags, dataset loading, the training loop, checkpoint layout, `--policy.path` loading,
the env processors and rollouts, eval_info.json and videos.

Runs are as short as possible (tiny images, a few training steps, one or two short episodes): about
3 minutes on an idle 2-core machine, most of it LIBERO's simulator. The training run of the
touch_block task is shared (module fixture) by the tests that need a checkpoint written by
lerobot-train. The LIBERO tests skip when LIBERO or its assets are not installed.

Every subprocess log is written under the test's temporary directory (`*.log`) and, on failure,
its tail is in the assertion message.
"""

import json
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import draccus  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_utils as e2e  # noqa: E402
from helpers import noise_for  # noqa: E402
from lerobot.configs.train import TrainPipelineConfig  # noqa: E402

from lerobot_llava3d_fusion.optim import FusedAdamWConfig  # noqa: E402

REPO_ROOT = e2e.REPO_ROOT
IMAGE_SIZE = 32  # touch_block and LIBERO images (the tiny vision tower works at 32 px anyway)
TB_REPO_ID = "local/touch_block"
LIBERO_SUITE = "libero_spatial"

PRETRAINED_FILES = (
    "config.json",
    "model.safetensors",
    "train_config.json",
    "policy_preprocessor.json",
    "policy_postprocessor.json",
)


def assert_ok(result: e2e.ScriptResult) -> None:
    assert result.returncode == 0, result.describe()


def assert_loss_went_down(result: e2e.ScriptResult, expected_last_step: int) -> list[tuple[int, float]]:
    losses = e2e.parse_train_losses(result.output)
    assert losses, f"no 'loss:' lines in the train log\n{result.describe()}"
    assert losses[-1][0] == expected_last_step, losses
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses), losses
    assert e2e.loss_decreased(losses), f"loss did not go down: {losses}"
    return losses


def assert_eval_outputs(output_dir: Path, n_episodes: int, group: str) -> dict:
    """eval_info.json with a success rate over `n_episodes` episodes, and at least one non-empty video."""
    info = e2e.read_json(output_dir / "eval_info.json")
    overall = info["overall"]
    assert overall["n_episodes"] == n_episodes
    assert 0.0 <= overall["pc_success"] <= 100.0
    assert group in info["per_group"], sorted(info["per_group"])
    videos = [Path(p) for p in overall["video_paths"]]
    assert videos and all(v.is_file() and v.stat().st_size > 0 for v in videos), videos
    assert all(v.suffix == ".mp4" and output_dir in v.parents for v in videos), videos
    return info


# ---- Fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lerobot_scripts")


@pytest.fixture(scope="module")
def touch_block_dataset(workdir) -> Path:
    from lerobot_llava3d_fusion.demo.make_touch_block_dataset import make_touch_block_dataset

    root = workdir / "touch_block_dataset"
    make_touch_block_dataset(root, TB_REPO_ID, num_episodes=3, seed=0, height=IMAGE_SIZE, width=IMAGE_SIZE)
    return root


TB_TRAIN_STEPS = 150


@pytest.fixture(scope="module")
def touch_block_run(workdir, touch_block_dataset) -> tuple[e2e.ScriptResult, Path]:
    """lerobot-train of the tiny policy (geometry=depth) on the touch_block dataset: (result, output_dir)."""
    output_dir = workdir / "touch_block_train"
    args = e2e.train_args(
        TB_REPO_ID, touch_block_dataset, output_dir, TB_TRAIN_STEPS, log_freq=5, batch_size=16, lr=3e-3,
        extra=["--policy.geometry=depth"],
    )  # fmt: skip
    result = e2e.run_lerobot("lerobot_train", args, workdir / "touch_block_train.log")
    return result, output_dir


@pytest.fixture(scope="module")
def touch_block_checkpoint(touch_block_run) -> Path:
    result, output_dir = touch_block_run
    assert_ok(result)
    return e2e.last_checkpoint(output_dir)


@pytest.fixture(scope="module")
def libero_ready():
    from lerobot_llava3d_fusion.tools.libero_setup import LiberoSetupError, ensure_libero_ready

    try:
        return ensure_libero_ready()
    except LiberoSetupError as err:
        pytest.skip(f"LIBERO is not installed: {err}")


# ---- 1. touch_block: train -> checkpoint -> eval ------------------------------------------------------


@pytest.mark.slow
def test_touch_block_train_writes_a_checkpoint_and_the_loss_goes_down(touch_block_run):
    result, output_dir = touch_block_run
    assert_ok(result)
    assert_loss_went_down(result, TB_TRAIN_STEPS)

    checkpoint = e2e.last_checkpoint(output_dir)
    assert (
        checkpoint.resolve()
        == (output_dir / "checkpoints" / f"{TB_TRAIN_STEPS:06d}" / "pretrained_model").resolve()
    )
    for name in PRETRAINED_FILES:
        assert (checkpoint / name).is_file(), sorted(p.name for p in checkpoint.iterdir())
    config = e2e.read_json(checkpoint / "config.json")
    assert config["type"] == "llava3d_fusion"
    assert config["vlm_model_name"] == "tiny" and config["geometry"] == "depth"
    # The features come from the dataset, depth and camera matrices included.
    assert set(config["input_features"]) == {
        "observation.images.top", "observation.depth.top", "observation.intrinsics.top",
        "observation.extrinsics.top", "observation.state",
    }  # fmt: skip
    assert config["output_features"]["action"]["shape"] == [3]
    train_config = e2e.read_json(checkpoint / "train_config.json")
    assert train_config["policy"]["type"] == "llava3d_fusion" and train_config["steps"] == TB_TRAIN_STEPS
    assert train_config["optimizer"]["type"] == "llava3d_fusion_adamw" and train_config["optimizer"]["fused"]
    # The saved train config parses back (as `lerobot-train --resume=true` does) with that optimizer.
    resumed = draccus.parse(TrainPipelineConfig, config_path=str(checkpoint / "train_config.json"), args=[])
    assert isinstance(resumed.optimizer, FusedAdamWConfig) and resumed.optimizer.fused

    preprocessor = e2e.read_json(checkpoint / "policy_preprocessor.json")
    steps = [step["registry_name"] for step in preprocessor["steps"]]
    assert "llava3d_fusion_tokenizer" in steps and "normalizer_processor" in steps
    tokenizer_step = preprocessor["steps"][steps.index("llava3d_fusion_tokenizer")]
    assert tokenizer_step["config"]["vlm_model_name"] == "tiny"
    postprocessor = e2e.read_json(checkpoint / "policy_postprocessor.json")
    assert [step["registry_name"] for step in postprocessor["steps"]][0] == "unnormalizer_processor"
    for pipeline in (preprocessor, postprocessor):
        for step in pipeline["steps"]:
            if "state_file" in step:  # normalization stats saved next to the pipeline
                assert (checkpoint / step["state_file"]).is_file(), step
    # A training state to resume from.
    assert (checkpoint.parent / "training_state" / "optimizer_state.safetensors").is_file()
    assert "Missing key(s)" not in result.output and "Unexpected key(s)" not in result.output


@pytest.mark.slow
def test_touch_block_eval_of_the_trained_checkpoint(workdir, touch_block_checkpoint):
    output_dir = workdir / "touch_block_eval"
    result = e2e.run_lerobot(
        "lerobot_eval",
        [
            f"--policy.path={touch_block_checkpoint}",
            "--env.type=touch_block",
            f"--env.observation_height={IMAGE_SIZE}",
            f"--env.observation_width={IMAGE_SIZE}",
            "--env.episode_length=10",
            "--eval.n_episodes=2",
            "--eval.batch_size=1",
            "--policy.device=cpu",
            f"--output_dir={output_dir}",
        ],
        workdir / "touch_block_eval.log",
    )
    assert_ok(result)
    info = assert_eval_outputs(output_dir, n_episodes=2, group="touch_block")
    assert len(info["per_task"][0]["metrics"]["successes"]) == 2
    assert "Missing key(s)" not in result.output and "Unexpected key(s)" not in result.output


@pytest.mark.slow
def test_touch_block_outcomes_of_the_trained_checkpoint(workdir, touch_block_checkpoint):
    summary_path = workdir / "touch_block_outcomes.json"
    result = e2e.run_module(
        "lerobot_llava3d_fusion.demo.touch_block_outcomes",
        [
            f"--policy-path={touch_block_checkpoint}",
            "--episodes=3",
            "--batch-size=2",  # two batches, the second one short
            f"--env-option=observation_height={IMAGE_SIZE}",
            f"--env-option=observation_width={IMAGE_SIZE}",
            "--env-option=episode_length=6",
            "--env-option=instruction_perturbation=shuffled",
            f"--output-json={summary_path}",
        ],
        workdir / "touch_block_outcomes.log",
    )
    assert_ok(result)
    summary = e2e.read_json(summary_path)
    assert summary["episodes"] == 3
    assert set(summary) >= {"success_pc", "ended_nearest_the_target_pc", "median_height_error_cm"}
    for key in (
        "success_pc",
        "ended_nearest_the_target_pc",
        "xy_within_radius_pc",
        "height_within_radius_pc",
    ):
        assert summary[key] in (0.0, 33.3, 66.7, 100.0), (key, summary[key])
    # Six steps of at most 2 cm cannot close a start more than 12 cm above every block top.
    assert summary["median_abs_height_error_cm"] >= 0.0 and summary["median_xy_error_cm"] >= 0.0


# ---- 2. A lerobot-train checkpoint gives the same actions in a fresh process ------------------------


@pytest.mark.slow
def test_checkpoint_loads_in_a_fresh_process_with_identical_actions(workdir, touch_block_checkpoint):
    from safetensors.torch import load_model

    import lerobot_llava3d_fusion  # noqa: F401

    env_kwargs = {"observation_height": IMAGE_SIZE, "observation_width": IMAGE_SIZE}
    observation = e2e.touch_block_observation(IMAGE_SIZE, IMAGE_SIZE, seed=7)
    config = e2e.read_json(touch_block_checkpoint / "config.json")
    noise = noise_for(config["chunk_size"], config["max_action_dim"], batch_size=1, seed=3)
    inputs = workdir / "predict_inputs.pt"
    torch.save({"observation": observation, "noise": noise}, inputs)

    # The child seeds its RNG differently before building the policy: anything the checkpoint does
    # not restore (a missing weight, a random buffer) would change its actions.
    child_output = workdir / "predict_child.pt"
    result = e2e.run_command(
        [sys.executable, str(Path(e2e.__file__)), "predict", f"--checkpoint={touch_block_checkpoint}",
         "--env-type=touch_block", f"--env-kwargs={json.dumps(env_kwargs)}", f"--inputs={inputs}",
         f"--output={child_output}", "--init-seed=12345"],
        workdir / "predict_child.log",
        timeout=180,
    )  # fmt: skip
    assert_ok(result)
    child = torch.load(child_output, weights_only=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same reduction order as the child
    try:
        parent = e2e.predict_like_lerobot_eval(
            touch_block_checkpoint, "touch_block", env_kwargs, observation, noise, init_seed=0
        )
    finally:
        torch.set_num_threads(threads)

    assert child["chunk"].shape == (1, config["chunk_size"], 3) and child["action"].shape == (1, 3)
    assert torch.isfinite(child["chunk"]).all()
    for key in ("chunk", "action"):
        assert torch.equal(child[key], parent[key]), (key, child[key], parent[key])
    torch.testing.assert_close(child["action"], child["chunk"][:, 0])  # select_action serves the chunk

    # Every weight of the policy is in model.safetensors (strict load of a freshly built policy).
    from lerobot.configs import PreTrainedConfig

    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

    fresh = Llava3DFusionPolicy(PreTrainedConfig.from_pretrained(touch_block_checkpoint))
    load_model(fresh, str(touch_block_checkpoint / "model.safetensors"), strict=True)


# ---- 3. LIBERO: lerobot-eval of untrained checkpoints built for LIBERO's features ---------------------


@pytest.mark.slow
@pytest.mark.parametrize("env_type", ["libero", "libero_rgbd"])
def test_lerobot_eval_on_libero(workdir, libero_ready, env_type):
    depth = env_type == "libero_rgbd"
    checkpoint = workdir / f"{env_type}_untrained"
    inputs, outputs = e2e.libero_features(IMAGE_SIZE, depth=depth)
    e2e.save_untrained_checkpoint(checkpoint, inputs, outputs, geometry="depth" if depth else "none")

    output_dir = workdir / f"{env_type}_eval"
    result = e2e.run_lerobot(
        "lerobot_eval",
        [
            f"--policy.path={checkpoint}",
            f"--env.type={env_type}",
            f"--env.task={LIBERO_SUITE}",
            "--env.task_ids=[0]",
            "--env.episode_length=10",
            f"--env.observation_height={IMAGE_SIZE}",
            f"--env.observation_width={IMAGE_SIZE}",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            "--policy.device=cpu",
            f"--output_dir={output_dir}",
        ],
        workdir / f"{env_type}_eval.log",
        timeout=300,
    )
    assert_ok(result)
    info = assert_eval_outputs(output_dir, n_episodes=1, group=LIBERO_SUITE)
    assert info["per_task"][0]["task_group"] == LIBERO_SUITE and info["per_task"][0]["task_id"] == 0
    assert "Missing key(s)" not in result.output and "Unexpected key(s)" not in result.output
    # With geometry="depth" the policy raises unless observation.depth.<cam> and the intrinsics reach it,
    # so finishing the episode shows that the env processors deliver them through lerobot-eval.


# ---- 4. A LIBERO dataset recorded from the sim trains with lerobot-train --------------------------------


LIBERO_TRAIN_STEPS = 120


@pytest.mark.slow
def test_recorded_libero_dataset_trains_with_depth(workdir, libero_ready):
    root = workdir / "libero_rgbd_dataset"
    record = e2e.run_module(
        "lerobot_llava3d_fusion.tools.record_libero_rgbd",
        [f"--root={root}", "--repo-id=local/libero_rgbd", f"--suite={LIBERO_SUITE}",
         "--task-ids", "0", "--episodes=2", "--steps=12", f"--image-size={IMAGE_SIZE}"],
        workdir / "libero_record.log",
        timeout=300,
    )  # fmt: skip
    assert_ok(record)
    info = e2e.read_json(root / "meta" / "info.json")
    assert info["total_episodes"] == 2 and info["total_frames"] == 24
    assert (
        "observation.depth.image" in info["features"] and "observation.intrinsics.image2" in info["features"]
    )

    output_dir = workdir / "libero_rgbd_train"
    result = e2e.run_lerobot(
        "lerobot_train",
        e2e.train_args(
            "local/libero_rgbd",
            root,
            output_dir,
            LIBERO_TRAIN_STEPS,
            log_freq=10,
            batch_size=16,
            lr=3e-3,
            extra=["--policy.geometry=depth"],
        ),
        workdir / "libero_rgbd_train.log",
    )
    assert_ok(result)
    assert_loss_went_down(result, LIBERO_TRAIN_STEPS)
    checkpoint = e2e.last_checkpoint(output_dir)
    for name in PRETRAINED_FILES:
        assert (checkpoint / name).is_file(), name
    config = e2e.read_json(checkpoint / "config.json")
    assert config["geometry"] == "depth"
    assert config["input_features"]["observation.state"]["shape"] == [8]
    assert config["output_features"]["action"]["shape"] == [7]
    for camera in ("image", "image2"):
        assert config["input_features"][f"observation.images.{camera}"]["type"] == "VISUAL"
        assert config["input_features"][f"observation.depth.{camera}"]["shape"] == [1, IMAGE_SIZE, IMAGE_SIZE]


# ---- 5. Hub: everything up to the upload ----------------------------------------------------------------


HUB_REPO_ID = "user/llava3d_fusion_touch_block"
HUB_FILES = {"config.json", "model.safetensors", "train_config.json", "README.md"}
PROCESSOR_FILES = {"policy_preprocessor.json", "policy_postprocessor.json"}


def assert_hub_upload(capture_dir: Path, dataset_repo_id: str) -> None:
    calls = e2e.read_calls(capture_dir)
    uploads = [c for c in calls if c["call"] == "upload_folder"]
    # One commit for the policy (weights, config, train config, card), one per processor pipeline.
    assert len(uploads) == 3, calls
    assert {c["repo_id"] for c in calls if c["call"] in ("create_repo", "upload_folder")} == {HUB_REPO_ID}
    assert all(c["repo_type"] == "model" for c in uploads)
    assert HUB_FILES <= set(uploads[0]["files"]), uploads[0]
    assert (
        "policy_preprocessor.json" in uploads[1]["files"]
        and "policy_postprocessor.json" in uploads[2]["files"]
    )

    repo = capture_dir / "repos" / HUB_REPO_ID
    files = {p.name for p in repo.iterdir()}
    assert HUB_FILES | PROCESSOR_FILES <= files, sorted(files)
    assert any(name.endswith("normalizer_processor.safetensors") for name in files), sorted(files)
    config = e2e.read_json(repo / "config.json")
    assert config["type"] == "llava3d_fusion" and config["repo_id"] == HUB_REPO_ID
    train_config = e2e.read_json(repo / "train_config.json")
    assert train_config["policy"]["type"] == "llava3d_fusion"
    assert train_config["dataset"]["repo_id"] == dataset_repo_id

    from huggingface_hub import ModelCard

    card = ModelCard((repo / "README.md").read_text())
    # This policy's card, not LeRobot's generic one (model_card.py): the tiny backbone has no Hub id
    # and no licence to inherit.
    assert card.data.license == "unknown" and card.data.base_model is None
    assert card.data.library_name == "lerobot" and card.data.pipeline_tag == "robotics"
    assert {"robotics", "lerobot", "llava3d_fusion"} <= set(card.data.tags)
    assert card.data.model_name == "llava3d_fusion"
    assert card.data.datasets in (dataset_repo_id, [dataset_repo_id])
    assert card.text.index("pip install lerobot_policy_llava3d_fusion") < card.text.index("lerobot-")
    assert f"--policy.path={HUB_REPO_ID}" in card.text
    assert f"--dataset.repo_id={dataset_repo_id}" in card.text  # the training command
    if config["geometry"] == "depth":
        assert "| depth of `top` | `observation.depth.top` |" in card.text and "float32 metres" in card.text
        assert "| intrinsics of `top` | `observation.intrinsics.top` |" in card.text
    # LeRobot validates the card with the Hub before uploading it.
    assert any(c["call"] == "validate_card" and "llava3d_fusion" in c["content"] for c in calls), calls

    # What was uploaded is a loadable policy.
    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

    policy = Llava3DFusionPolicy.from_pretrained(repo)
    assert policy.config.type == "llava3d_fusion"


@pytest.mark.slow
def test_push_model_to_hub_uploads_a_complete_repo(
    workdir, touch_block_checkpoint, touch_block_dataset, monkeypatch
):
    """What lerobot-train does at the end with --policy.push_to_hub=true, called directly."""
    from lerobot.datasets import LeRobotDatasetMetadata
    from lerobot.policies import make_pre_post_processors

    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

    capture_dir = workdir / "hub_direct"
    for owner, name, replacement in e2e.hub_capture_patches(capture_dir):
        monkeypatch.setattr(owner, name, replacement)

    train_cfg = TrainPipelineConfig.from_pretrained(touch_block_checkpoint)
    train_cfg.policy.push_to_hub = True
    train_cfg.policy.repo_id = HUB_REPO_ID
    policy = Llava3DFusionPolicy.from_pretrained(touch_block_checkpoint, config=train_cfg.policy)
    preprocessor, postprocessor = make_pre_post_processors(
        train_cfg.policy, pretrained_path=touch_block_checkpoint
    )
    dataset_meta = LeRobotDatasetMetadata(TB_REPO_ID, root=touch_block_dataset)

    policy.push_model_to_hub(train_cfg, dataset_meta=dataset_meta)
    preprocessor.push_to_hub(train_cfg.policy.repo_id)
    postprocessor.push_to_hub(train_cfg.policy.repo_id)
    assert_hub_upload(capture_dir, TB_REPO_ID)


@pytest.mark.slow
def test_lerobot_train_push_to_hub_flag(workdir, touch_block_dataset):
    """lerobot-train --policy.push_to_hub=true --policy.repo_id=...: only HfApi's network calls replaced."""
    capture_dir = workdir / "hub_train"
    output_dir = workdir / "hub_train_run"
    args = e2e.train_args(TB_REPO_ID, touch_block_dataset, output_dir, steps=2, log_freq=1)
    args = [a for a in args if a != "--policy.push_to_hub=false"]
    args += ["--policy.push_to_hub=true", f"--policy.repo_id={HUB_REPO_ID}", "--policy.geometry=depth"]
    result = e2e.run_command(
        [sys.executable, str(Path(e2e.__file__)), "train-capturing-hub", str(capture_dir), *args],
        workdir / "hub_train.log",
    )
    assert_ok(result)
    assert f"Model pushed to https://huggingface.co/{HUB_REPO_ID}" in result.output
    assert_hub_upload(capture_dir, TB_REPO_ID)
    card = (capture_dir / "repos" / HUB_REPO_ID / "README.md").read_text()
    assert "--policy.geometry=depth" in card and "| depth of `top` |" in card


# ---- 6. A checkpoint whose features do not match the env fails clearly ---------------------------------


def run_mismatched_eval(workdir: Path, name: str, checkpoint: Path, env_args: list[str]) -> e2e.ScriptResult:
    return e2e.run_lerobot(
        "lerobot_eval",
        [f"--policy.path={checkpoint}", *env_args, "--env.episode_length=3", "--eval.n_episodes=1",
         "--eval.batch_size=1", "--policy.device=cpu", f"--output_dir={workdir / name}"],
        workdir / f"{name}.log",
    )  # fmt: skip


@pytest.mark.slow
def test_touch_block_checkpoint_on_libero_names_the_missing_camera(
    workdir, libero_ready, touch_block_checkpoint
):
    result = run_mismatched_eval(
        workdir, "mismatch_camera", touch_block_checkpoint,
        ["--env.type=libero", f"--env.task={LIBERO_SUITE}", "--env.task_ids=[0]",
         f"--env.observation_height={IMAGE_SIZE}", f"--env.observation_width={IMAGE_SIZE}"],
    )  # fmt: skip
    assert result.returncode != 0, result.describe()
    message = result.error_message
    assert "observation.images.top" in message, result.describe()
    assert not (workdir / "mismatch_camera" / "eval_info.json").exists()


@pytest.mark.slow
def test_checkpoint_expecting_another_state_size_names_the_state(workdir):
    """A checkpoint for camera 'top' with an 8-d state, evaluated on touch_block (3-d state)."""
    checkpoint = workdir / "top_state8_untrained"
    inputs, outputs = e2e.libero_features(IMAGE_SIZE, cameras=("top",), state_dim=8, action_dim=3)
    e2e.save_untrained_checkpoint(checkpoint, inputs, outputs)
    result = run_mismatched_eval(
        workdir, "mismatch_state", checkpoint,
        ["--env.type=touch_block", f"--env.observation_height={IMAGE_SIZE}",
         f"--env.observation_width={IMAGE_SIZE}"],
    )  # fmt: skip
    assert result.returncode != 0, result.describe()
    message = result.error_message
    # The error must say which feature does not match and how: the policy's 8 against the env's 3.
    assert "observation.state" in message, f"unclear error:\n{message}"
    assert re.search(r"\b8\b", message) and re.search(r"\b3\b", message), f"unclear error:\n{message}"
