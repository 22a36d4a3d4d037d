"""Training memory per shipped LIBERO preset, by arithmetic (not a measurement).

Each preset's backbone is rebuilt from its published sizes (the config.json of its Hub checkpoint,
written down below; nothing is downloaded) on torch's meta device, with the preset's own policy
fields, and its parameters are counted: all of them and those that train (`freeze_vision_encoder`,
`train_expert_only`). Memory is then

    weights        every parameter x bytes per stored element (bf16: 2, float32: 4),
                   plus a float32 master copy of what trains under `dtype=bfloat16`
    gradients      trained parameters x 4 bytes (float32, as the master weights)
    AdamW state    trained parameters x 2 x 4 bytes (two float32 moments)

Activations, the CUDA context and the allocator's slack come on top and are not counted.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/memory_per_preset.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from unittest import mock

import torch
from lerobot.configs import FeatureType, PolicyFeature
from transformers import (
    AutoModelForDepthEstimation,
    CLIPVisionConfig,
    DepthAnythingConfig,
    DPTImageProcessor,
    LlamaConfig,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from lerobot_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.backbones.loading import build_tiny_tokenizer, siglip_llava_config
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy
from lerobot_llava3d_fusion.presets import preset_names, preset_path

GIB = 1024**3
ESTIMATOR_MODULE = "lerobot_llava3d_fusion.geometry.depth_estimation"

# Published sizes of the presets' backbones (their Hub config.json files).
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                         num_attention_heads=16, patch_size=14, image_size=384)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, patch_size=14, image_size=336)
BACKBONES = {
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": (
        Qwen2Config, dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
        SiglipVisionConfig, SIGLIP_SO400M_384),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": (
        Qwen2Config, dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
        SiglipVisionConfig, SIGLIP_SO400M_384),
    "ChaimZhu/LLaVA-3D-7B": (
        LlamaConfig, dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32),
        CLIPVisionConfig, CLIP_L_336),
}
# The depth model of `geometry=estimator` presets (frozen): Depth Anything V2 Small's published sizes.
DEPTH_ESTIMATORS = {
    "depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf": dict(
        backbone_config=dict(model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                             patch_size=14, image_size=518, out_indices=[3, 6, 9, 12], reshape_hidden_states=False),
        neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, reassemble_hidden_size=384,
        depth_estimation_type="metric", max_depth=20),
}


def write_backbone(name: str, directory: Path) -> str:
    """A LLaVA checkpoint directory at `name`'s published sizes, without weights."""
    text_class, text_fields, vision_class, vision_fields = BACKBONES[name]
    tokenizer = build_tiny_tokenizer()
    text_config = text_class(**text_fields, pad_token_id=tokenizer.pad_token_id)
    vision_config = vision_class(**vision_fields)
    siglip_llava_config(text_config, vision_config, image_token_id=tokenizer.pad_token_id).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    size = {"height": vision_config.image_size, "width": vision_config.image_size}
    SiglipImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    return directory.as_posix()


def libero_features(with_depth: bool) -> dict[str, PolicyFeature]:
    """LeRobot's LIBERO inputs (two cameras at 256 px, 8-d state), with depth and intrinsics if asked."""
    features = {"observation.state": PolicyFeature(FeatureType.STATE, (8,))}
    for camera in ("image", "image2"):
        features[f"observation.images.{camera}"] = PolicyFeature(FeatureType.VISUAL, (3, 256, 256))
        if with_depth:
            features[f"observation.depth.{camera}"] = PolicyFeature(FeatureType.VISUAL, (1, 256, 256))
            features[f"observation.intrinsics.{camera}"] = PolicyFeature(FeatureType.STATE, (3, 3))
    return features


def count_parameters(policy_fields: dict) -> tuple[int, int]:
    """(all, trained) parameters of the policy a preset's `policy` section builds."""
    fields = {key: value for key, value in policy_fields.items() if key not in ("type", "device")}
    with tempfile.TemporaryDirectory() as directory:
        fields.pop("vision_tower_name", None)  # the tower's sizes are part of the written checkpoint
        fields["vlm_model_name"] = write_backbone(fields["vlm_model_name"], Path(directory))
        config = Llava3DFusionConfig(
            **{**fields, "load_vlm_weights": False, "device": "cpu"},
            input_features=libero_features(fields.get("geometry") == "depth"),
            output_features={"action": PolicyFeature(FeatureType.ACTION, (7,))},
        )
        # On the meta device nothing is computed: skip the decoder check that runs a few tokens at load;
        # a depth estimator is built from its published sizes instead of downloaded.
        estimator = DEPTH_ESTIMATORS.get(fields.get("depth_estimator_name"))
        with (
            torch.device("meta"),
            mock.patch("lerobot_llava3d_fusion.backbones.loading.check_decoder_contract"),
            mock.patch(f"{ESTIMATOR_MODULE}.AutoModelForDepthEstimation.from_pretrained",
                       lambda name: AutoModelForDepthEstimation.from_config(DepthAnythingConfig(**estimator))),
            mock.patch(f"{ESTIMATOR_MODULE}.AutoImageProcessor", mock.Mock(from_pretrained=lambda name: DPTImageProcessor())),
        ):
            policy = Llava3DFusionPolicy(config)
    parameters = list(policy.parameters())
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def memory_bytes(total: int, trained: int, dtype: str) -> dict[str, float]:
    """Weights, gradients and AdamW state in bytes, by the rules in the module docstring."""
    if dtype == "bfloat16":
        weights = (total - trained) * 2 + trained * 4  # frozen parts in bf16, float32 masters for the rest
    else:
        weights = total * 4
    return {"weights": weights, "gradients": trained * 4, "adamw": trained * 8}


def main() -> None:
    rows = []
    for name in preset_names():
        preset = json.loads(preset_path(name).read_text())
        policy = preset["policy"]
        if policy["vlm_model_name"] not in BACKBONES:
            continue  # the demo's tiny CPU backbone
        total, trained = count_parameters(policy)
        parts = memory_bytes(total, trained, policy.get("dtype", "float32"))
        rows.append((name, total, trained, parts, sum(parts.values())))
    print("| preset | parameters (trained) | weights (GiB) | gradients (GiB) | AdamW state (GiB) | sum (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, total, trained, parts, whole in rows:
        print(
            f"| {name} | {total / 1e9:.2f} B ({trained / 1e9:.2f} B) | {parts['weights'] / GIB:.1f} |"
            f" {parts['gradients'] / GIB:.1f} | {parts['adamw'] / GIB:.1f} | {whole / GIB:.1f} |"
        )


if __name__ == "__main__":
    main()
