"""Every way LeRobot's scripts train a checkpoint, with a backbone from a local directory, in bf16.

One chain of unmodified `lerobot-train` / `lerobot-eval` runs on the touch_block dataset (depth,
intrinsics and extrinsics recorded), `--policy.dtype=bfloat16` (Accelerate's bf16 autocast on CPU,
real optimizer steps) and `--policy.vlm_model_name=<a local LLaVA checkpoint directory>`:

    fresh training (2 steps) -> --resume to 4 steps -> fine-tuning that checkpoint on the dataset
    (--policy.path) -> the backbone directory is deleted -> lerobot-eval, from_pretrained, and a Hub
    push whose uploaded files alone load again.

Fine-tuning and resuming rebuild the normaliser with every input feature: had they normalised the
camera matrices (constant in this dataset, so std 0), the policy's pinhole check would have stopped
the run.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_utils as e2e  # noqa: E402
from helpers import noise_for  # noqa: E402

IMAGE_SIZE = 32
REPO_ID = "local/touch_block"
GEOMETRY_KEYS = {"observation.depth.top", "observation.intrinsics.top", "observation.extrinsics.top"}


def assert_ok(result: e2e.ScriptResult) -> None:
    assert result.returncode == 0, result.describe()


def write_backbone(directory: Path) -> Path:
    """A tiny LLaVA checkpoint laid out as a Hub download: weights, config, tokenizer, image processor."""
    from transformers import SiglipImageProcessor

    from lerobot_llava3d_fusion.backbones.loading import build_tiny_llava

    torch.manual_seed(0)
    model, tokenizer = build_tiny_llava("qwen2")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory


def assert_geometry_never_normalised(checkpoint: Path) -> None:
    preprocessor = e2e.read_json(checkpoint / "policy_preprocessor.json")
    (normalizer,) = [s for s in preprocessor["steps"] if s["registry_name"] == "normalizer_processor"]
    assert normalizer["config"]["normalize_observation_keys"] == ["observation.state"]
    assert GEOMETRY_KEYS <= set(normalizer["config"]["features"])


def stored_dtypes(checkpoint: Path) -> dict[str, str]:
    with safe_open(checkpoint / "model.safetensors", framework="pt") as reader:
        return {key: str(reader.get_slice(key).get_dtype()) for key in reader.keys()}


@pytest.mark.slow
def test_fresh_resume_finetune_and_eval_without_the_backbone_directory(tmp_path, monkeypatch):
    from lerobot_llava3d_fusion.demo.make_touch_block_dataset import make_touch_block_dataset

    dataset = tmp_path / "dataset"
    make_touch_block_dataset(dataset, REPO_ID, num_episodes=2, seed=0, height=IMAGE_SIZE, width=IMAGE_SIZE)
    backbone = write_backbone(tmp_path / "backbone_download")
    common = ["--policy.geometry=depth", "--policy.dtype=bfloat16", f"--policy.vlm_model_name={backbone}"]

    # 1. Fresh training, checkpoint at step 2.
    run = tmp_path / "run"
    args = e2e.train_args(REPO_ID, dataset, run, steps=2, log_freq=1, batch_size=4, extra=common)
    assert_ok(e2e.run_lerobot("lerobot_train", args, tmp_path / "fresh.log"))
    fresh = run / "checkpoints" / "000002" / "pretrained_model"
    assert_geometry_never_normalised(fresh)
    assert (fresh / "backbone" / "config.json").is_file() and (
        fresh / "backbone" / "tokenizer.json"
    ).is_file()
    dtypes = stored_dtypes(fresh)
    # bf16 recipe: what trains is stored in float32; the frozen vision tower in bf16.
    assert {d for k, d in dtypes.items() if ".vision_tower." in k} == {"BF16"}
    assert {d for k, d in dtypes.items() if ".vision_tower." not in k} == {"F32"}

    # 2. --resume to step 4 from the step-2 checkpoint.
    resume_args = [f"--config_path={fresh / 'train_config.json'}", "--resume=true", "--steps=4"]
    result = e2e.run_lerobot("lerobot_train", resume_args, tmp_path / "resume.log")
    assert_ok(result)
    losses = e2e.parse_train_losses(result.output)
    assert [step for step, _ in losses] == [3, 4], losses
    resumed = run / "checkpoints" / "000004" / "pretrained_model"
    assert_geometry_never_normalised(resumed)

    # 3. Fine-tuning the resumed checkpoint on the dataset (new stats, every feature re-normalised).
    finetune = tmp_path / "finetune"
    finetune_args = [
        f"--policy.path={resumed}",
        f"--dataset.repo_id={REPO_ID}",
        f"--dataset.root={dataset}",
        "--dataset.depth_output_unit=m",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        "--batch_size=4",
        "--steps=2",
        "--save_freq=2",
        "--log_freq=1",
        "--num_workers=0",
        "--env_eval_freq=0",
        f"--output_dir={finetune}",
        "--wandb.enable=false",
    ]
    assert_ok(e2e.run_lerobot("lerobot_train", finetune_args, tmp_path / "finetune.log"))
    finetuned = e2e.last_checkpoint(finetune)
    assert_geometry_never_normalised(finetuned)
    assert e2e.read_json(finetuned / "config.json")["dtype"] == "bfloat16"

    # 4. The backbone's own directory is gone: the checkpoint alone serves lerobot-eval and from_pretrained.
    env_kwargs = {"observation_height": IMAGE_SIZE, "observation_width": IMAGE_SIZE}
    observation = e2e.touch_block_observation(IMAGE_SIZE, IMAGE_SIZE, seed=3)
    noise = noise_for(4, 32, batch_size=1, seed=4)
    before = e2e.predict_like_lerobot_eval(finetuned, "touch_block", env_kwargs, observation, noise, 0)
    shutil.rmtree(backbone)
    after = e2e.predict_like_lerobot_eval(finetuned, "touch_block", env_kwargs, observation, noise, 99)
    assert torch.equal(before["chunk"], after["chunk"])
    eval_dir = tmp_path / "eval"
    result = e2e.run_lerobot(
        "lerobot_eval",
        [
            f"--policy.path={finetuned}",
            "--env.type=touch_block",
            f"--env.observation_height={IMAGE_SIZE}",
            f"--env.observation_width={IMAGE_SIZE}",
            "--env.episode_length=4",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            "--policy.device=cpu",
            f"--output_dir={eval_dir}",
        ],
        tmp_path / "eval.log",
    )
    assert_ok(result)
    assert e2e.read_json(eval_dir / "eval_info.json")["overall"]["n_episodes"] == 1

    # 5. Pushed to the Hub (LeRobot's push, network calls captured): the uploaded files alone load.
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.policies import make_pre_post_processors

    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

    capture = tmp_path / "hub"
    for owner, name, replacement in e2e.hub_capture_patches(capture):
        monkeypatch.setattr(owner, name, replacement)
    train_cfg = TrainPipelineConfig.from_pretrained(finetuned)
    train_cfg.policy.repo_id = "user/llava3d_fusion_bf16"
    policy = Llava3DFusionPolicy.from_pretrained(finetuned, config=train_cfg.policy)
    preprocessor, postprocessor = make_pre_post_processors(train_cfg.policy, pretrained_path=finetuned)
    policy.push_model_to_hub(train_cfg)
    preprocessor.push_to_hub(train_cfg.policy.repo_id)
    postprocessor.push_to_hub(train_cfg.policy.repo_id)
    uploaded = [
        file for call in e2e.read_calls(capture) if call["call"] == "upload_folder" for file in call["files"]
    ]
    assert {"backbone/config.json", "backbone/preprocessor_config.json", "backbone/tokenizer.json"} <= set(
        uploaded
    )
    assert any(file.endswith("llava3d_fusion_tokenizer.safetensors") for file in uploaded), uploaded
    repo = capture / "repos" / train_cfg.policy.repo_id
    from_hub = e2e.predict_like_lerobot_eval(repo, "touch_block", env_kwargs, observation, noise, 7)
    assert torch.equal(from_hub["chunk"], before["chunk"])


# lerobot-train, SIGKILLed as soon as its first checkpoint is complete (LeRobot points `last` at it).
TRAIN_KILLED_AFTER_FIRST_CHECKPOINT = """
import os, signal
import lerobot.scripts.lerobot_train as train
update_last_checkpoint = train.update_last_checkpoint
def update_then_die(checkpoint_dir):
    update_last_checkpoint(checkpoint_dir)
    os.kill(os.getpid(), signal.SIGKILL)
train.update_last_checkpoint = update_then_die
train.main()
"""

# lerobot-train that also writes, to ./loaded_state, the policy's weights and the optimizer state as
# they are right after `--resume` loaded the checkpoint (before the first resumed step).
TRAIN_RECORDING_THE_RESUMED_STATE = """
from pathlib import Path
from safetensors.torch import save_file
import lerobot.scripts.lerobot_train as train
from lerobot.optim.optimizers import save_optimizer_state
policies = []
make_policy, load_training_state = train.make_policy, train.load_training_state
def make_and_keep_policy(*args, **kwargs):
    policies.append(make_policy(*args, **kwargs))
    return policies[-1]
def load_and_record(checkpoint_dir, optimizer, scheduler, **kwargs):
    step, optimizer, scheduler = load_training_state(checkpoint_dir, optimizer, scheduler, **kwargs)
    out = Path("loaded_state")
    out.mkdir()
    weights = {k: v.detach().clone().contiguous() for k, v in policies[-1].state_dict().items()}
    save_file(weights, out / "policy.safetensors")
    save_optimizer_state(optimizer, out)
    (out / "step.txt").write_text(str(step))
    return step, optimizer, scheduler
train.make_policy, train.load_training_state = make_and_keep_policy, load_and_record
train.main()
"""


def safetensors_dict(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as reader:
        return {key: reader.get_tensor(key) for key in reader.keys()}


@pytest.mark.slow
def test_a_run_killed_after_its_first_checkpoint_resumes_from_that_checkpoint(tmp_path):
    """lerobot-train (4 steps, a checkpoint every 2) SIGKILLed right after its step-2 checkpoint, then
    `--resume=true` from that checkpoint's train_config.json: the resumed run starts from exactly the
    saved weights, optimizer state and step, trains steps 3 and 4 and checkpoints step 4.

    (A run never stopped ends with other step-4 weights, seen with LeRobot 0.6.1 on the CPU although
    LeRobot restores the data order and RNG state; hence the test checks that the resume loads exactly
    what was saved, rather than comparing with such a run.)
    """
    from lerobot.utils.constants import OPTIMIZER_STATE, TRAINING_STATE_DIR, TRAINING_STEP

    from lerobot_llava3d_fusion.demo.make_touch_block_dataset import make_touch_block_dataset

    dataset = tmp_path / "dataset"
    make_touch_block_dataset(dataset, REPO_ID, num_episodes=2, seed=0, height=IMAGE_SIZE, width=IMAGE_SIZE)
    run = tmp_path / "run"
    args = e2e.train_args(REPO_ID, dataset, run, steps=4, log_freq=1, batch_size=4)
    args = [arg if not arg.startswith("--save_freq=") else "--save_freq=2" for arg in args]
    killed = e2e.run_command(
        [sys.executable, "-c", TRAIN_KILLED_AFTER_FIRST_CHECKPOINT, *args], tmp_path / "killed.log"
    )
    assert killed.returncode == -9, killed.describe()
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["000002", "last"]

    saved = run / "checkpoints" / "000002"
    resume = [f"--config_path={saved / 'pretrained_model' / 'train_config.json'}", "--resume=true"]
    result = e2e.run_command(
        [sys.executable, "-c", TRAIN_RECORDING_THE_RESUMED_STATE, *resume], tmp_path / "resume.log"
    )
    assert_ok(result)
    assert [step for step, _ in e2e.parse_train_losses(result.output)] == [3, 4]

    loaded = tmp_path / "loaded_state"
    assert (loaded / "step.txt").read_text() == "2"
    saved_weights = safetensors_dict(saved / "pretrained_model" / "model.safetensors")
    loaded_weights = safetensors_dict(loaded / "policy.safetensors")
    saved_optimizer = safetensors_dict(saved / TRAINING_STATE_DIR / OPTIMIZER_STATE)
    loaded_optimizer = safetensors_dict(loaded / OPTIMIZER_STATE)
    assert saved_weights.keys() <= loaded_weights.keys() and saved_optimizer.keys() == loaded_optimizer.keys()
    for expected, actual in ((saved_weights, loaded_weights), (saved_optimizer, loaded_optimizer)):
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), key
    final_state = run / "checkpoints" / "000004" / TRAINING_STATE_DIR
    assert e2e.read_json(final_state / TRAINING_STEP)["step"] == 4
    optimizer = safetensors_dict(final_state / OPTIMIZER_STATE)
    steps = {key: value for key, value in optimizer.items() if key.rsplit("/", 1)[-1] == "step"}
    assert steps and all(value.item() == 4 for value in steps.values()), steps
