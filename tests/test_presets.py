"""The `lerobot-train` presets shipped in `lerobot_llava3d_fusion/presets/` (docs/recipes.md explains them).

Each preset is parsed as `lerobot-train --config_path=<preset>` parses it (draccus, then
`TrainPipelineConfig.validate`); no model is built and nothing is downloaded. The camera intrinsics of
`libero_estimated_depth` are checked against LIBERO's simulator in tests/test_libero_rgbd.py.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import draccus  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from lerobot.configs.train import TrainPipelineConfig  # noqa: E402
from lerobot.envs.configs import LiberoEnv  # noqa: E402
from lerobot.optim import CosineDecayWithWarmupSchedulerConfig  # noqa: E402
from lerobot.policies.pi0.configuration_pi0 import PI0Config  # noqa: E402
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig  # noqa: E402

from lerobot_llava3d_fusion import Llava3DFusionConfig  # noqa: E402
from lerobot_llava3d_fusion.optim import FusedAdamWConfig  # noqa: E402
from lerobot_llava3d_fusion.presets import preset_names, preset_path  # noqa: E402

# LeRobot's LIBERO page evaluates over these four suites; its LIBERO dataset holds all four.
FOUR_SUITES = "libero_spatial,libero_object,libero_goal,libero_10"
LEROBOT_LIBERO_DATASET = "lerobot/libero"
OPTIMIZER_FIELDS = (
    "optimizer_lr",
    "optimizer_betas",
    "optimizer_eps",
    "optimizer_weight_decay",
    "optimizer_grad_clip_norm",
    "scheduler_warmup_steps",
    "scheduler_decay_steps",
    "scheduler_decay_lr",
)
# A trainable parameter costs 16 bytes with float32 master weights and AdamW (weight, gradient, two
# moments): 7e9 of them fill more than an 80 GB GPU before any activation, so 7B full fine-tunes
# recompute activations.
FULL_FINETUNES = ("libero", "libero_estimated_depth", "libero_llava3d", "own_dataset")
NEEDS_GRADIENT_CHECKPOINTING = ("libero_llava3d",)


def parse_preset(name: str, monkeypatch, *args: str) -> TrainPipelineConfig:
    """As `lerobot-train --config_path=<preset> <args>` (lerobot.configs.parser.wrap, then validate,
    which reads sys.argv for --policy.path)."""
    path = preset_path(name)
    monkeypatch.setattr(sys, "argv", ["lerobot-train", f"--config_path={path}", *args])
    cfg = draccus.parse(TrainPipelineConfig, config_path=str(path), args=list(args))
    cfg.validate()
    return cfg


def optimizer_values(config) -> dict:
    return {field: getattr(config, field) for field in OPTIMIZER_FIELDS}


def test_the_package_ships_the_documented_presets():
    assert set(preset_names()) == {
        "libero",
        "libero_7b",
        "libero_estimated_depth",
        "libero_llava3d",
        "own_dataset",
        "touch_block_demo",
    }


@pytest.mark.parametrize("name", ["libero", "libero_7b", "libero_estimated_depth"])
def test_libero_presets_train_on_lerobots_dataset_and_evaluate_the_four_suites(name, monkeypatch):
    raw = json.loads(preset_path(name).read_text())
    assert raw["policy"]["device"] == "cuda"  # the recipe is for a GPU; on CPU LeRobot falls back
    cfg = parse_preset(name, monkeypatch)

    assert cfg.dataset.repo_id == LEROBOT_LIBERO_DATASET
    policy = cfg.policy
    assert isinstance(policy, Llava3DFusionConfig) and policy.load_vlm_weights
    assert policy.vlm_model_name.startswith("llava-hf/llava-onevision-qwen2-")
    assert policy.dtype == "bfloat16" and policy.image_pooling == 3
    assert 27 % policy.image_pooling == 0  # SigLIP-so400m at 384 px, 14 px patches: a 27 x 27 grid -> 9 x 9
    assert (policy.chunk_size, policy.n_action_steps) == (50, 10)
    assert policy.freeze_vision_encoder and not policy.push_to_hub
    assert policy.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert isinstance(cfg.env, LiberoEnv) and cfg.env.type == "libero" and cfg.env.task == FOUR_SUITES
    assert (cfg.env.observation_height, cfg.env.observation_width) == (256, 256)  # the dataset's image size
    assert 0 < cfg.env_eval_freq <= cfg.steps
    # The policy's optimizer and scheduler presets reach LeRobot's training loop.
    assert cfg.use_policy_training_preset
    assert isinstance(cfg.optimizer, FusedAdamWConfig) and cfg.optimizer.fused
    assert cfg.optimizer.lr == policy.optimizer_lr
    assert cfg.optimizer.weight_decay == policy.optimizer_weight_decay
    assert cfg.optimizer.grad_clip_norm == policy.optimizer_grad_clip_norm
    assert isinstance(cfg.scheduler, CosineDecayWithWarmupSchedulerConfig)
    assert cfg.scheduler.num_decay_steps == cfg.steps


@pytest.mark.parametrize("name", FULL_FINETUNES)
def test_full_finetunes_use_pi0s_optimizer(name, monkeypatch):
    """pi0 / pi05 fine-tune their whole network with these values (lr 2.5e-5, weight decay 0.01, clip 1)."""
    policy = parse_preset(name, monkeypatch, "--dataset.repo_id=user/dataset").policy
    assert not policy.train_expert_only
    assert optimizer_values(policy) == optimizer_values(PI0Config())
    assert policy.gradient_checkpointing == (name in NEEDS_GRADIENT_CHECKPOINTING)


def test_the_7b_preset_trains_the_expert_only_with_smolvlas_optimizer(monkeypatch):
    """7.6 B trainable parameters would need 122 GB for weights and AdamW alone: the VLM stays frozen and
    the expert trains with the values SmolVLA trains its expert-only fine-tune with."""
    policy = parse_preset("libero_7b", monkeypatch).policy
    assert policy.vlm_model_name == "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    assert policy.train_expert_only
    assert optimizer_values(policy) == optimizer_values(SmolVLAConfig())
    assert not policy.gradient_checkpointing  # the frozen VLM stream stores no activations


def test_estimated_depth_preset_gives_every_libero_camera_intrinsics(monkeypatch):
    cfg = parse_preset("libero_estimated_depth", monkeypatch)
    policy = cfg.policy
    assert policy.geometry == "estimator" and policy.depth_estimator_name
    # One matrix per camera LeRobot's LIBERO env (and dataset) delivers: observation.images.<cam>.
    cameras = {
        key.removeprefix("observation.images.")
        for key in cfg.env.features_map.values()
        if key.startswith("observation.images.")
    }
    assert set(policy.camera_intrinsics) == cameras == {"image", "image2"}
    for matrix in policy.camera_intrinsics.values():
        (fx, skew, cx), (zero, fy, cy), last_row = matrix
        assert fx == -fy < 0 and skew == zero == 0  # a mirrored view of a square-pixel camera
        assert (cx, cy) == (127.5, 127.5) and last_row == [0.0, 0.0, 1.0]  # centre of the 256 px grid


def test_own_dataset_preset_runs_no_libero_evaluation(monkeypatch):
    cfg = parse_preset("own_dataset", monkeypatch, "--dataset.repo_id=user/dataset")
    assert cfg.dataset.repo_id == "user/dataset"
    assert cfg.env is None  # lerobot-train evaluates in an env only when one is configured
    assert cfg.policy.geometry == "none"

    # With depth: the flags docs/recipes.md gives.
    depth = parse_preset(
        "own_dataset",
        monkeypatch,
        "--dataset.repo_id=user/dataset",
        "--dataset.depth_output_unit=m",
        "--policy.geometry=depth",
        '--policy.camera_intrinsics={"front": [[600, 0, 319.5], [0, 600, 239.5], [0, 0, 1]]}',
    )
    assert depth.env is None and depth.dataset.depth_output_unit == "m"
    assert depth.policy.geometry == "depth" and depth.policy.camera_intrinsics["front"][0][0] == 600


def test_own_dataset_preset_without_a_dataset_names_the_missing_flag(monkeypatch):
    with pytest.raises(Exception, match="dataset"):
        parse_preset("own_dataset", monkeypatch)
