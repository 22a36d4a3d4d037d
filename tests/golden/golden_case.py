"""The golden case: a tiny geometry=depth policy with two cameras, and fixed inputs for it."""

import torch
from helpers import CAMERAS, preprocess, raw_batch, tiny_config
from lerobot.configs import FeatureType, PolicyFeature

from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

CHECKPOINT = "tiny_depth_policy"
OUTPUTS = "tiny_depth_policy_outputs.safetensors"
DEPTH_SIZE = 16
INTRINSICS = [[14.0, 0.0, 7.5], [0.0, 14.0, 7.5], [0.0, 0.0, 1.0]]


def golden_policy() -> Llava3DFusionPolicy:
    features = {key: PolicyFeature(FeatureType.VISUAL, (3, 40, 40)) for key in CAMERAS}
    features["observation.state"] = PolicyFeature(FeatureType.STATE, (5,))
    features["observation.depth.top"] = PolicyFeature(FeatureType.VISUAL, (1, DEPTH_SIZE, DEPTH_SIZE))
    torch.manual_seed(0)
    return Llava3DFusionPolicy(
        tiny_config(
            geometry="depth",
            geometry_gate_init=1.0,
            input_features=features,
            camera_intrinsics={"top": INTRINSICS},
        )
    )


def golden_inputs(policy: Llava3DFusionPolicy) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(preprocessed batch, noise, time), all deterministic."""
    raw = raw_batch(seed=11, tasks=["pick up the red block and put it in the bowl", "push"])
    generator = torch.Generator().manual_seed(12)
    raw["observation.depth.top"] = 0.4 + torch.rand(2, 1, DEPTH_SIZE, DEPTH_SIZE, generator=generator)
    batch = preprocess(policy, raw)
    noise = torch.randn(2, policy.config.chunk_size, policy.config.max_action_dim, generator=generator)
    time = torch.tensor([0.25, 0.75])
    return batch, noise, time
