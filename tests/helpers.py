"""Tiny random policies and batches for the tests (offline, CPU): import from here, not from conftest."""

import torch
from lerobot.configs import FeatureType, PolicyFeature

from lerobot_llava3d_fusion import Llava3DFusionConfig, make_llava3d_fusion_pre_post_processors
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

CAMERAS = ("observation.images.top", "observation.images.wrist")
STATE_DIM = 5
ACTION_DIM = 3
CHUNK = 6


def tiny_config(**overrides) -> Llava3DFusionConfig:
    fields = dict(
        vlm_model_name="tiny",
        chunk_size=CHUNK,
        n_action_steps=CHUNK,
        max_state_dim=8,
        max_action_dim=4,
        num_steps=4,
        device="cpu",
        input_features={
            **{key: PolicyFeature(FeatureType.VISUAL, (3, 40, 40)) for key in CAMERAS},
            "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
    )
    fields.update(overrides)
    return Llava3DFusionConfig(**fields)


def tiny_policy(seed: int = 0, **overrides) -> Llava3DFusionPolicy:
    torch.manual_seed(seed)
    return Llava3DFusionPolicy(tiny_config(**overrides))


def raw_batch(batch_size: int = 2, tasks=None, seed: int = 0) -> dict:
    """A batch as LeRobot's dataloader / env hands it to the preprocessor."""
    generator = torch.Generator().manual_seed(seed)
    batch = {key: torch.rand(batch_size, 3, 40, 40, generator=generator) for key in CAMERAS}
    batch["observation.state"] = torch.randn(batch_size, STATE_DIM, generator=generator)
    batch["action"] = torch.rand(batch_size, CHUNK, ACTION_DIM, generator=generator) * 2 - 1
    batch["task"] = list(tasks) if tasks is not None else ["pick up the red block", "push"][:batch_size]
    return batch


def preprocess(policy: Llava3DFusionPolicy, batch: dict, **processor_overrides) -> dict:
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(policy.config, dataset_stats=None)
    return preprocessor(batch)


def noise_for(chunk_size: int, max_action_dim: int, batch_size: int = 2, seed: int = 1) -> torch.Tensor:
    """Flow-matching start noise (B, chunk_size, max_action_dim), float32, drawn from a generator seeded with
    `seed`: the same tensor on every call, so actions computed from it compare exactly."""
    shape = (batch_size, chunk_size, max_action_dim)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def fixed_noise(policy: Llava3DFusionPolicy, batch_size: int = 2, seed: int = 1) -> torch.Tensor:
    """`noise_for` the policy's chunk_size and max_action_dim."""
    return noise_for(policy.config.chunk_size, policy.config.max_action_dim, batch_size, seed)
