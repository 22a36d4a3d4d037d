"""Backbones from checkpoints on disk, laid out exactly as the real ones, loaded as a user loads them.

Formats: transformers' LLaVA (LLaVA-1.5 style, Llama/Mistral LLM, CLIP/SigLIP tower), transformers'
LLaVA-OneVision (Qwen2 LLM, SigLIP tower) and the original LLaVA-3D layout (Llama LLM + mlp2x_gelu
projector in one safetensors state dict, vision tower from a separate CLIP/SigLIP checkpoint).
"""

import json

import pytest
import torch
from helpers import ACTION_DIM, CHUNK, fixed_noise, preprocess, raw_batch, tiny_config
from lerobot.configs import FeatureType, PolicyFeature
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    BertConfig,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from lerobot_llava3d_fusion.backbones.backbone import vision_transformer
from lerobot_llava3d_fusion.backbones.llava3d import map_llava3d_key
from lerobot_llava3d_fusion.backbones.loading import build_tiny_tokenizer, load_backbone
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

VISION_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
GRID = 32 // 8  # patch grid side
LLM_LAYERS = 3
LLM_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": LLM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
VOCAB = len(build_tiny_tokenizer())
LLM_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}

# Where a few tensors live in each layout (transformers 5 saves LLaVA under these legacy names).
TRANSFORMERS_KEYS = {
    "embed_tokens": "model.language_model.model.embed_tokens.weight",
    "q_proj": "model.language_model.model.layers.0.self_attn.q_proj.weight",
    "projector": "model.multi_modal_projector.linear_1.weight",
    "vision_q_proj": "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
}
LLAVA3D_POSITION_PREFIX = "model.video_tower.video_tower.positional_embedding."
LLAVA3D_KEYS = {
    "embed_tokens": "model.embed_tokens.weight",
    "q_proj": "model.layers.0.self_attn.q_proj.weight",
    "projector": "model.mm_projector.0.weight",
}
VISION_TOWER_KEYS = {"vision_q_proj": "vision_model.encoder.layers.0.self_attn.q_proj.weight"}


# ------------------------------------------------------------------------------ checkpoint writers


def vision_config(tower: str):
    return CLIPVisionConfig(**VISION_SIZES) if tower == "clip" else SiglipVisionConfig(**VISION_SIZES)


def save_image_processor(directory, tower: str) -> None:
    if tower == "clip":
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            directory
        )
    else:
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)


def save_llava(directory, llm_type: str, tower: str):
    """A llava-hf/llava-1.5-style checkpoint: CLS-dropping "default" features of layer -2 for CLIP."""
    torch.manual_seed(1)
    config = LlavaConfig(
        vision_config=vision_config(tower),
        text_config=LLM_CONFIGS[llm_type](vocab_size=VOCAB, **LLM_SIZES),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
        image_token_id=VOCAB - 1,
        image_seq_length=GRID**2,
    )
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    save_image_processor(directory, tower)
    return directory


def save_onevision(directory):
    """A llava-hf/llava-onevision-style checkpoint: Qwen2 LLM, SigLIP tower, "full" features."""
    torch.manual_seed(2)
    config = LlavaOnevisionConfig(
        vision_config=vision_config("siglip"),
        text_config=Qwen2Config(vocab_size=VOCAB, **LLM_SIZES),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_token_id=VOCAB - 1,
    )
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    save_image_processor(directory, "siglip")
    return directory


def save_vision_tower(directory, tower: str):
    """A full CLIP checkpoint (as openai/clip-vit-*) or a vision-only SigLIP one, with its processor."""
    torch.manual_seed(3)
    if tower == "clip":
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        CLIPModel(CLIPConfig(vision_config=VISION_SIZES, text_config=text)).save_pretrained(directory)
    else:
        SiglipVisionModel(vision_config("siglip")).save_pretrained(directory)
    save_image_processor(directory, tower)
    return directory


def llava3d_config(**overrides) -> dict:
    """config.json of an original LLaVA-3D checkpoint (a LlamaConfig plus the LLaVA mm_* fields)."""
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
        **LLM_SIZES,
        "mm_hidden_size": VISION_SIZES["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_video_tower": "SpatialAwareModule",
        "mm_patch_merge_type": "flat",
        **overrides,
    }


def llava3d_tensors() -> dict[str, torch.Tensor]:
    """The state dict of an original LLaVA-3D checkpoint, in bfloat16 as released."""
    torch.manual_seed(4)
    width, vision_width = LLM_SIZES["hidden_size"], VISION_SIZES["hidden_size"]
    llm = LlamaModel(LlamaConfig(vocab_size=VOCAB, **LLM_SIZES))
    tensors = {f"model.{key}": value for key, value in llm.state_dict().items()}
    tensors |= {
        "lm_head.weight": torch.randn(VOCAB, width),
        "model.mm_projector.0.weight": torch.randn(width, vision_width),
        "model.mm_projector.0.bias": torch.randn(width),
        "model.mm_projector.2.weight": torch.randn(width, width),
        "model.mm_projector.2.bias": torch.randn(width),
        # The original's own towers: not used (the tower comes from vision_tower_name).
        "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": torch.randn(
            4, 3, 8, 8
        ),
        # The 3D click prompt encoder of its video tower (PromptEncoder, on the LLM width): not used.
        "model.video_tower.prompt_encoder.pos_emb3d.position_embedding_head.0.weight": torch.randn(width, 3),
        "model.video_tower.prompt_encoder.pos_emb3d.position_embedding_head.3.weight": torch.randn(
            width, width
        ),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(8),
    }
    # The 3D position MLP of its video tower (SpatialAwareModule.positional_embedding, on the vision
    # width): Sequential(Linear(3, C), LayerNorm(C), ReLU, Linear(C, C)), kept by the policy.
    tensors |= {
        LLAVA3D_POSITION_PREFIX + key: value
        for key, value in {
            "position_embedding_head.0.weight": torch.randn(vision_width, 3),
            "position_embedding_head.0.bias": torch.randn(vision_width),
            "position_embedding_head.1.weight": 1.0 + 0.1 * torch.randn(vision_width),
            "position_embedding_head.1.bias": 0.1 * torch.randn(vision_width),
            "position_embedding_head.3.weight": torch.randn(vision_width, vision_width) / vision_width**0.5,
            "position_embedding_head.3.bias": torch.randn(vision_width),
        }.items()
    }
    return {key: value.to(torch.bfloat16).contiguous() for key, value in tensors.items()}


def save_llava3d(
    directory, tensors: dict[str, torch.Tensor] | None = None, shards: int = 1, **config_overrides
):
    """Write an original LLaVA-3D checkpoint: config.json, safetensors (optionally sharded), tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = llava3d_tensors() if tensors is None else tensors
    (directory / "config.json").write_text(json.dumps(llava3d_config(**config_overrides)))
    build_tiny_tokenizer().save_pretrained(directory)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        filename = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        shard_keys = keys[shard::shards]
        save_file({key: tensors[key] for key in shard_keys}, directory / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard_keys, filename)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def saved_tensors(*directories) -> dict[str, torch.Tensor]:
    """Every safetensors tensor in these directories, as float32."""
    tensors = {}
    for directory in directories:
        for file in directory.glob("*.safetensors"):
            with safe_open(file, framework="pt") as reader:
                tensors |= {key: reader.get_tensor(key).float() for key in reader.keys()}
    return tensors


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple]:
    """format name -> (vlm_model_name dir, vision_tower_name dir or None)."""
    root = tmp_path_factory.mktemp("checkpoints")
    clip = save_vision_tower(root / "clip", "clip")
    siglip = save_vision_tower(root / "siglip", "siglip")
    return {
        "llava-llama-clip": (save_llava(root / "llava-llama-clip", "llama", "clip"), None),
        "llava-mistral-siglip": (save_llava(root / "llava-mistral-siglip", "mistral", "siglip"), None),
        "onevision-qwen2-siglip": (save_onevision(root / "onevision"), None),
        "llava3d-clip": (save_llava3d(root / "llava3d-clip"), clip),
        "llava3d-siglip-sharded": (save_llava3d(root / "llava3d-siglip", shards=2), siglip),
    }


FORMATS = [
    "llava-llama-clip",
    "llava-mistral-siglip",
    "onevision-qwen2-siglip",
    "llava3d-clip",
    "llava3d-siglip-sharded",
]


def checkpoint_policy(checkpoints, fmt: str, seed: int = 0, **overrides) -> Llava3DFusionPolicy:
    vlm_dir, tower_dir = checkpoints[fmt]
    torch.manual_seed(seed)
    return Llava3DFusionPolicy(
        tiny_config(vlm_model_name=str(vlm_dir), vision_tower_name=tower_dir and str(tower_dir), **overrides)
    )


def saved_under_either_layout(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The tensor `key` names in transformers 5.5's saved layout, or in 5.24's, which saves a LLaVA
    model without the leading `model.` and its towers without their `vision_model.` level."""
    candidates = {key}
    for old, new in (("vision_model.", ""), ("model.", "")):
        candidates |= {candidate.replace(old, new, 1) for candidate in candidates}
    for candidate in sorted(candidates, key=len, reverse=True):
        if candidate in tensors:
            return tensors[candidate]
    raise KeyError(key)


def expected_tensors(checkpoints, fmt: str) -> dict[str, torch.Tensor]:
    """name -> the tensor on disk, for the names of TRANSFORMERS_KEYS."""
    vlm_dir, tower_dir = checkpoints[fmt]
    if tower_dir is None:
        tensors = saved_tensors(vlm_dir)
        return {name: saved_under_either_layout(tensors, key) for name, key in TRANSFORMERS_KEYS.items()}
    tensors, tower = saved_tensors(vlm_dir), saved_tensors(tower_dir)
    return {name: tensors[key] for name, key in LLAVA3D_KEYS.items()} | {
        name: saved_under_either_layout(tower, key) for name, key in VISION_TOWER_KEYS.items()
    }


def loaded_tensors(policy: Llava3DFusionPolicy) -> dict[str, torch.Tensor]:
    model = policy.model
    return {
        "embed_tokens": model.embed_tokens.weight,
        "q_proj": model.fusion.vlm_layers[0].self_attn.q_proj.weight,
        "projector": model.image_encoder.projector.linear_1.weight,
        "vision_q_proj": vision_transformer(model.image_encoder.vision_tower)
        .encoder.layers[0]
        .self_attn.q_proj.weight,
    }


def normalised_pixels(policy: Llava3DFusionPolicy, batch_size: int = 2) -> torch.Tensor:
    pixels = torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return (pixels - policy.model.image_mean) / policy.model.image_std


# --------------------------------------------------------------------------------- loading works


@pytest.mark.transformers_range
@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_come_from_the_checkpoint(checkpoints, fmt):
    policy = checkpoint_policy(checkpoints, fmt)
    loaded = loaded_tensors(policy)
    for name, expected in expected_tensors(checkpoints, fmt).items():
        assert torch.equal(loaded[name], expected), name
    # Image normalisation comes from the (vision tower's) image processor config.
    tower = "clip" if "clip" in fmt else "siglip"
    processor = CLIPImageProcessor() if tower == "clip" else SiglipImageProcessor()
    torch.testing.assert_close(policy.model.image_mean.flatten(), torch.tensor(processor.image_mean))
    torch.testing.assert_close(policy.model.image_std.flatten(), torch.tensor(processor.image_std))


@pytest.mark.transformers_range
@pytest.mark.parametrize("fmt", FORMATS)
def test_policy_from_a_checkpoint_trains_and_samples(checkpoints, fmt):
    policy = checkpoint_policy(checkpoints, fmt)
    batch = preprocess(policy, raw_batch())  # the tokenizer step loads the checkpoint's tokenizer
    policy.train()
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)
    grad = policy.model.fusion.vlm_layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    actions = policy.predict_action_chunk(batch)
    assert actions.shape == (2, CHUNK, ACTION_DIM)
    assert torch.isfinite(actions).all()


@pytest.mark.parametrize("fmt", ["llava-llama-clip", "onevision-qwen2-siglip", "llava3d-clip"])
def test_random_init_builds_the_checkpoint_architecture(checkpoints, fmt):
    policy = checkpoint_policy(checkpoints, fmt, load_vlm_weights=False)
    loaded = loaded_tensors(policy)
    for name, expected in expected_tensors(checkpoints, fmt).items():
        assert loaded[name].shape == expected.shape, name
        assert not torch.equal(loaded[name], expected), name
    assert len(policy.model.fusion.vlm_layers) == LLM_LAYERS


def test_llava15_drops_the_cls_token_like_transformers(checkpoints):
    vlm_dir, _ = checkpoints["llava-llama-clip"]
    policy = checkpoint_policy(checkpoints, "llava-llama-clip")
    pixels = normalised_pixels(policy)
    tokens = policy.model.image_encoder(pixels)
    assert tokens.shape == (2, GRID**2, LLM_SIZES["hidden_size"])  # not GRID**2 + 1
    reference = LlavaForConditionalGeneration.from_pretrained(vlm_dir).model.get_image_features(
        pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
    )
    assert reference.hidden_states[-2].shape[1] == GRID**2 + 1  # the tower does output a CLS token
    torch.testing.assert_close(tokens, torch.stack(reference.pooler_output))


@pytest.mark.parametrize(
    "fmt, tower_cls, drops_cls",
    [
        ("llava3d-clip", CLIPVisionModel, True),
        ("llava3d-siglip-sharded", SiglipVisionModel, False),  # SigLIP has no CLS token to drop
    ],
)
def test_llava3d_image_tokens_match_the_original_computation(checkpoints, fmt, tower_cls, drops_cls):
    vlm_dir, tower_dir = checkpoints[fmt]
    policy = checkpoint_policy(checkpoints, fmt)
    pixels = normalised_pixels(policy)
    # The original: tower features of layer mm_vision_select_layer (CLS dropped for "patch"), then
    # mm_projector = Sequential(Linear, GELU, Linear).
    features = tower_cls.from_pretrained(tower_dir)(pixels, output_hidden_states=True).hidden_states[-2]
    features = features[:, 1:] if drops_cls else features
    tensors = saved_tensors(vlm_dir)
    mm_projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    mm_projector.load_state_dict(
        {
            key.removeprefix("model.mm_projector."): value
            for key, value in tensors.items()
            if "mm_projector" in key
        }
    )
    torch.testing.assert_close(policy.model.image_encoder(pixels), mm_projector(features))


def test_llava3d_key_mapping():
    assert map_llava3d_key("model.layers.3.mlp.up_proj.weight") == (
        "language_model",
        "layers.3.mlp.up_proj.weight",
    )
    assert map_llava3d_key("model.embed_tokens.weight") == ("language_model", "embed_tokens.weight")
    assert map_llava3d_key("model.norm.weight") == ("language_model", "norm.weight")
    assert map_llava3d_key("model.mm_projector.0.bias") == ("projector", "linear_1.bias")
    assert map_llava3d_key("model.mm_projector.2.weight") == ("projector", "linear_2.weight")
    assert map_llava3d_key("lm_head.weight") == ("skipped", "lm_head.")
    assert map_llava3d_key("model.video_tower.encoder.weight") == ("skipped", "model.video_tower.")
    assert map_llava3d_key(LLAVA3D_POSITION_PREFIX + "position_embedding_head.3.bias") == (
        "position_encoder",
        "position_embedding_head.3.bias",
    )
    prompt_key = "model.video_tower.prompt_encoder.pos_emb3d.position_embedding_head.0.weight"
    assert map_llava3d_key(prompt_key) == ("skipped", "model.video_tower.")
    assert map_llava3d_key(LLAVA3D_POSITION_PREFIX + "position_embedding_head.2.weight") is None
    assert map_llava3d_key("model.layers.0.self_attn.rotary_emb.inv_freq") == (
        "skipped",
        "rotary_emb.inv_freq",
    )
    assert map_llava3d_key("model.mm_projector.4.weight") is None
    assert map_llava3d_key("model.grounding_head.weight") is None


@pytest.mark.parametrize("fmt", ["llava-llama-clip", "llava3d-clip"])
def test_from_pretrained_of_a_policy_built_from_a_checkpoint_gives_identical_actions(
    checkpoints, tmp_path, fmt
):
    policy = checkpoint_policy(checkpoints, fmt)
    batch = preprocess(policy, raw_batch())
    noise = fixed_noise(policy, seed=6)
    before = policy.predict_action_chunk(batch, noise=noise)
    policy.save_pretrained(tmp_path)
    torch.manual_seed(123)  # the reloaded backbone starts from other random weights
    reloaded = Llava3DFusionPolicy.from_pretrained(tmp_path)
    assert reloaded.config.load_vlm_weights is False
    assert torch.equal(reloaded.predict_action_chunk(batch, noise=noise), before)


@pytest.mark.transformers_range
@pytest.mark.parametrize("fmt", ["llava-llama-clip", "onevision-qwen2-siglip", "llava3d-clip"])
def test_a_saved_policy_needs_nothing_but_its_checkpoint(checkpoints, tmp_path, fmt):
    """Train-time backbone directories deleted: the checkpoint alone rebuilds policy and preprocessor."""
    import shutil

    from lerobot.processor import PolicyProcessorPipeline

    from lerobot_llava3d_fusion import make_llava3d_fusion_pre_post_processors

    vlm_dir, tower_dir = checkpoints[fmt]
    moved_vlm = shutil.copytree(vlm_dir, tmp_path / "vlm")
    moved_tower = tower_dir and shutil.copytree(tower_dir, tmp_path / "tower")
    torch.manual_seed(0)
    policy = Llava3DFusionPolicy(
        tiny_config(vlm_model_name=str(moved_vlm), vision_tower_name=moved_tower and str(moved_tower))
    )
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(policy.config)
    raw = raw_batch()
    batch = preprocessor(dict(raw))
    noise = fixed_noise(policy, seed=6)
    before = policy.predict_action_chunk(batch, noise=noise)
    checkpoint = tmp_path / "checkpoint"
    policy.save_pretrained(checkpoint)
    preprocessor.save_pretrained(checkpoint)
    shutil.rmtree(moved_vlm)
    if moved_tower:
        shutil.rmtree(moved_tower)

    files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
    # The image processor belongs to the vision tower: the LLaVA checkpoint's, or the separate one's.
    image_processor_dir = "backbone/vision_tower" if moved_tower else "backbone"
    assert {
        "backbone/config.json",
        "backbone/tokenizer.json",
        f"{image_processor_dir}/preprocessor_config.json",
    } <= files
    assert ("backbone/vision_tower/config.json" in files) == (moved_tower is not None)
    assert not any(name.startswith("backbone/") and name.endswith(".safetensors") for name in files)

    torch.manual_seed(123)  # the rebuilt backbone starts from other random weights
    reloaded = Llava3DFusionPolicy.from_pretrained(checkpoint)
    reloaded_preprocessor = PolicyProcessorPipeline.from_pretrained(checkpoint, "policy_preprocessor.json")
    reloaded_batch = reloaded_preprocessor(dict(raw))
    assert torch.equal(reloaded_batch["observation.language.tokens"], batch["observation.language.tokens"])
    assert torch.equal(reloaded.predict_action_chunk(reloaded_batch, noise=noise), before)
    torch.testing.assert_close(reloaded.model.image_mean, policy.model.image_mean, atol=0, rtol=0)

    # Saving the reloaded policy again (fine-tuning a checkpoint) carries the same files on.
    resaved = tmp_path / "resaved"
    reloaded.save_pretrained(resaved)
    assert (resaved / "backbone" / "config.json").read_text() == (
        checkpoint / "backbone" / "config.json"
    ).read_text()


def test_a_checkpoint_on_the_hub_brings_its_backbone_files(checkpoints, tmp_path, monkeypatch):
    """`--policy.path=user/repo`: the backbone folder comes from the repo, not from vlm_model_name."""
    import shutil

    from lerobot_llava3d_fusion.backbones import files as backbone_files

    vlm_dir, _ = checkpoints["llava-llama-clip"]
    moved = shutil.copytree(vlm_dir, tmp_path / "vlm")
    policy = Llava3DFusionPolicy(tiny_config(vlm_model_name=str(moved)))
    repo = tmp_path / "hub" / "user--policy"
    policy.save_pretrained(repo)
    shutil.rmtree(moved)
    requests = []

    def snapshot_download(repo_id, allow_patterns, **options):
        requests.append((repo_id, allow_patterns, options))
        return str(repo)

    monkeypatch.setattr(backbone_files, "snapshot_download", snapshot_download)
    config = policy.config
    source = backbone_files.checkpoint_backbone_source("user/policy", config, revision="v1", strict=True)
    assert requests == [("user/policy", ["backbone/**"], {"revision": "v1"})]
    assert source == backbone_files.BackboneSource(str(repo / "backbone"), None)
    config.load_vlm_weights = False  # as from_pretrained sets it: the weights come from the checkpoint
    rebuilt = Llava3DFusionPolicy(config, backbone_source=source)
    assert rebuilt.model.fusion.vlm_layers[0].self_attn.q_proj.weight.shape == (64, 64)


# ---------------------------------------------------------------------------- pooling and layers


def test_image_pooling_averages_patch_neighbourhoods(checkpoints):
    plain = checkpoint_policy(checkpoints, "llava-llama-clip")
    pooled = checkpoint_policy(checkpoints, "llava-llama-clip", image_pooling=2)
    pixels = normalised_pixels(plain)
    tokens = plain.model.image_encoder(pixels)  # (2, 16, D)
    pooled_tokens = pooled.model.image_encoder(pixels)  # (2, 4, D)
    assert pooled_tokens.shape[1] == tokens.shape[1] // 2**2
    # Row-major 4x4 grid -> 2x2 grid of block means.
    blocks = tokens.view(2, 2, 2, 2, 2, -1)  # (B, block row, row in block, block col, col in block, D)
    torch.testing.assert_close(pooled_tokens, blocks.mean(dim=(2, 4)).flatten(1, 2))
    loss, _ = pooled.forward(preprocess(pooled, raw_batch()))
    assert torch.isfinite(loss)


def test_patch_grid_is_reported_after_pooling(checkpoints):
    vlm_dir, _ = checkpoints["llava-llama-clip"]
    assert load_backbone(str(vlm_dir), load_weights=False).patch_grid == (GRID, GRID)
    backbone = load_backbone(str(vlm_dir), load_weights=False, image_pooling=2)
    assert backbone.patch_grid == (GRID // 2, GRID // 2)
    assert backbone.feature_grid == (GRID, GRID)


def test_image_pooling_must_divide_the_patch_grid(checkpoints):
    with pytest.raises(ValueError, match=r"image_pooling=3 must divide the 4x4 patch grid.*\[1, 2, 4\]"):
        checkpoint_policy(checkpoints, "llava-llama-clip", image_pooling=3)


@pytest.mark.parametrize("fmt", ["onevision-qwen2-siglip", "llava3d-clip"])
def test_num_vlm_layers_keeps_the_first_loaded_layers(checkpoints, fmt):
    policy = checkpoint_policy(checkpoints, fmt, num_vlm_layers=1)
    assert len(policy.model.fusion.vlm_layers) == 1
    assert torch.equal(loaded_tensors(policy)["q_proj"], expected_tensors(checkpoints, fmt)["q_proj"])
    with pytest.raises(ValueError, match=f"num_vlm_layers=5 but the LLM has only {LLM_LAYERS} layers"):
        checkpoint_policy(checkpoints, fmt, num_vlm_layers=5)


# ---------------------------------------------------------------------------------------- errors


def test_missing_checkpoint_directory_raises(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="expected a local checkpoint directory containing config.json"
    ):
        load_backbone(str(tmp_path / "does-not-exist"), load_weights=True)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_backbone(str(tmp_path), load_weights=True)


@pytest.mark.parametrize(
    "config",
    [
        BertConfig().to_dict(),
        {**llava3d_config(), "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral"},
    ],
)
def test_unknown_architecture_raises(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"unsupported architecture.*expected one of: original LLaVA-3D.*transformers LLaVA"
    ):
        load_backbone(str(tmp_path), load_weights=True)


def save_llava_with_llm(directory, text_config):
    LlavaConfig(vision_config=vision_config("clip"), text_config=text_config).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    save_image_processor(directory, "clip")
    return directory


def test_a_decoder_with_parts_the_fusion_loop_would_skip_is_rejected(tmp_path):
    directory = save_llava_with_llm(tmp_path, Gemma2Config(vocab_size=VOCAB, head_dim=16, **LLM_SIZES))
    with pytest.raises(ValueError, match=r"parts the fusion loop would skip: \['post_feedforward_layernorm'"):
        load_backbone(str(directory), load_weights=False)


def test_a_decoder_whose_forward_computes_more_than_its_layers_is_rejected():
    from lerobot_llava3d_fusion.model.fusion import check_decoder_contract

    class ScaledLlama(LlamaModel):  # the layer layout of Llama, plus an embedding scale in forward
        def forward(self, inputs_embeds=None, **kwargs):
            return super().forward(inputs_embeds=inputs_embeds * 8.0, **kwargs)

    check_decoder_contract(LlamaModel(LlamaConfig(vocab_size=VOCAB, **LLM_SIZES)), "llama")
    with pytest.raises(ValueError, match=r"does not reproduce its LLM's \(ScaledLlama\) own forward"):
        check_decoder_contract(ScaledLlama(LlamaConfig(vocab_size=VOCAB, **LLM_SIZES)), "scaled")


def test_a_decoder_of_the_same_layout_is_accepted_by_the_contract(tmp_path):
    # Gemma keeps its embedding scale inside embed_tokens: the fusion loop computes exactly its forward.
    directory = save_llava_with_llm(tmp_path, GemmaConfig(vocab_size=VOCAB, head_dim=16, **LLM_SIZES))
    backbone = load_backbone(str(directory), load_weights=False)
    assert type(backbone.language_model).__name__ == "GemmaModel"


def test_llava3d_needs_vision_tower_name(checkpoints):
    vlm_dir, _ = checkpoints["llava3d-clip"]
    with pytest.raises(ValueError, match="set vision_tower_name .*openai/clip-vit-large-patch14-336"):
        load_backbone(str(vlm_dir), load_weights=True)


def test_vision_tower_name_is_rejected_for_checkpoints_with_their_own_tower(checkpoints):
    vlm_dir, _ = checkpoints["llava-llama-clip"]
    clip_dir = checkpoints["llava3d-clip"][1]
    with pytest.raises(ValueError, match="vision_tower_name=.* is only used for original LLaVA-3D"):
        load_backbone(str(vlm_dir), load_weights=True, vision_tower_name=str(clip_dir))


def test_vision_tower_name_must_be_clip_or_siglip(checkpoints):
    vlm_dir, _ = checkpoints["llava3d-clip"]
    llava_dir, _ = checkpoints["llava-llama-clip"]
    with pytest.raises(ValueError, match="'llava' checkpoint; expected a CLIP or SigLIP vision tower"):
        load_backbone(str(vlm_dir), load_weights=True, vision_tower_name=str(llava_dir))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("model.norm.weight"), r"LLM weights.*missing: \['norm.weight'\]"),
        (lambda t: t.pop("model.mm_projector.2.bias"), r"projector weights.*missing: \['linear_2.bias'\]"),
        (
            lambda t: t.update({"model.grounding_head.weight": torch.zeros(2)}),
            r"unknown.*model.grounding_head.weight",
        ),
        (
            lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
            r"unknown.*layers.0.mlp.extra.weight",
        ),
    ],
)
def test_llava3d_missing_or_unknown_keys_raise(checkpoints, tmp_path, change, message):
    tensors = llava3d_tensors()
    change(tensors)
    vlm_dir = save_llava3d(tmp_path / "llava3d", tensors)
    with pytest.raises(ValueError, match=message):
        load_backbone(str(vlm_dir), load_weights=True, vision_tower_name=str(checkpoints["llava3d-clip"][1]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"mm_projector_type": "linear"},
            "mm_projector_type 'linear' is not supported; expected 'mlp2x_gelu'",
        ),
        ({"mm_hidden_size": 1024}, "has hidden size 32, but the projector .* expects mm_hidden_size=1024"),
        ({"num_attention_heads": None}, r"config.json lacks \['num_attention_heads'\]"),
    ],
)
def test_llava3d_bad_config_raises(checkpoints, tmp_path, overrides, message):
    vlm_dir = save_llava3d(tmp_path / "llava3d", **overrides)
    config = json.loads((vlm_dir / "config.json").read_text())
    (vlm_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(ValueError, match=message):
        load_backbone(str(vlm_dir), load_weights=True, vision_tower_name=str(checkpoints["llava3d-clip"][1]))


def test_llava3d_without_safetensors_raises(checkpoints, tmp_path):
    vlm_dir = save_llava3d(tmp_path / "llava3d")
    (vlm_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_backbone(str(vlm_dir), load_weights=True, vision_tower_name=str(checkpoints["llava3d-clip"][1]))


# ---------------------------------------------------------------- LLaVA-3D's own 3D position encoder

DEPTH_SIZE = 24
INTRINSICS = [[20.0, 0.0, 11.5], [0.0, 20.0, 11.5], [0.0, 0.0, 1.0]]
CAMERA_NAMES = ("top", "wrist")


def depth_config_fields() -> dict:
    """geometry="depth" for both cameras of the helpers' batches, intrinsics from the config."""
    features = dict(tiny_config().input_features)
    for name in CAMERA_NAMES:
        features[f"observation.depth.{name}"] = PolicyFeature(FeatureType.STATE, (1, DEPTH_SIZE, DEPTH_SIZE))
    return dict(
        geometry="depth",
        input_features=features,
        camera_intrinsics=dict.fromkeys(CAMERA_NAMES, INTRINSICS),
    )


def camera_to_world(angle: float, translation) -> torch.Tensor:
    """A (4, 4) camera-to-world pose: rotation about z by `angle`, then `translation`."""
    pose = torch.eye(4)
    cos, sin = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    pose[:2, :2] = torch.tensor([[cos, -sin], [sin, cos]])
    pose[:3, 3] = torch.tensor(translation)
    return pose


def depth_batch(policy, scale: float = 1.0, image_size: int = 40) -> dict:
    """A preprocessed batch with depth and camera-to-world extrinsics for both cameras."""
    batch = raw_batch()
    generator = torch.Generator().manual_seed(7)
    for index, name in enumerate(CAMERA_NAMES):
        batch[f"observation.images.{name}"] = torch.rand(2, 3, image_size, image_size, generator=generator)
        depth = 0.5 + torch.rand(2, 1, DEPTH_SIZE, DEPTH_SIZE, generator=generator)
        batch[f"observation.depth.{name}"] = depth * scale
        batch[f"observation.extrinsics.{name}"] = camera_to_world(0.3 + index, [0.1, -0.2 * index, 0.5])[
            None
        ].expand(2, 4, 4)
    return preprocess(policy, batch)


def original_position_mlp(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """LLaVA-3D's PositionEmbeddingLearnedMLP head, filled from the checkpoint's tensors."""
    width = VISION_SIZES["hidden_size"]
    head = nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width))
    head.load_state_dict(
        {
            key.removeprefix(LLAVA3D_POSITION_PREFIX + "position_embedding_head."): value
            for key, value in tensors.items()
            if key.startswith(LLAVA3D_POSITION_PREFIX)
        }
    )
    return head


def test_llava3d_checkpoint_keeps_its_3d_position_encoder(checkpoints):
    vlm_dir, _ = checkpoints["llava3d-clip"]
    policy = checkpoint_policy(checkpoints, "llava3d-clip", **depth_config_fields())
    assert policy.model.geometry_encoder_kind == "llava3d_mlp"
    encoder = policy.model.geometry_encoder.position_mlp
    assert encoder.gate is None  # pretrained weights: no gate in front of them
    on_disk = {
        key.removeprefix(LLAVA3D_POSITION_PREFIX): value
        for key, value in saved_tensors(vlm_dir).items()
        if key.startswith(LLAVA3D_POSITION_PREFIX)
    }
    carried = {
        f"position_embedding_head.{key}": value
        for key, value in encoder.position_embedding_head.state_dict().items()
    }
    assert carried.keys() == on_disk.keys() and len(on_disk) == 6
    for key, value in on_disk.items():
        assert torch.equal(carried[key], value), key
    # Nothing else of the 3D path has parameters: the checkpoint's MLP is the whole encoder.
    assert set(policy.model.geometry_encoder.state_dict()) == {f"position_mlp.{key}" for key in on_disk}


def test_llava3d_prefix_patch_features_follow_the_original_equations(checkpoints):
    """prefix patches = mm_projector(tower features + MLP(xyz)), xyz the nearest resize of the
    back-projected world-frame xyz map to the tower's patch grid."""
    vlm_dir, tower_dir = checkpoints["llava3d-clip"]
    policy = checkpoint_policy(checkpoints, "llava3d-clip", **depth_config_fields())
    batch = depth_batch(policy, image_size=32)  # the tower's size: no resize in the model
    inputs = policy._prepare_inputs(batch)
    prefix, prefix_mask, _ = policy.model.embed_prefix(
        inputs.images, inputs.camera_geometry, inputs.lang_tokens, inputs.lang_mask
    )

    tensors = saved_tensors(vlm_dir)
    mm_projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    mm_projector.load_state_dict(
        {key.removeprefix("model.mm_projector."): v for key, v in tensors.items() if "mm_projector" in key}
    )
    position_mlp = original_position_mlp(tensors)
    tower = CLIPVisionModel.from_pretrained(tower_dir)
    processor = CLIPImageProcessor()
    mean, std = (
        torch.tensor(processor.image_mean).view(1, 3, 1, 1),
        torch.tensor(processor.image_std).view(1, 3, 1, 1),
    )
    # Pixel (u, v) of the depth grid: camera point ((u - cx) z / fx, (v - cy) z / fy, z), then the pose.
    v, u = torch.meshgrid(torch.arange(DEPTH_SIZE).float(), torch.arange(DEPTH_SIZE).float(), indexing="ij")
    fx, cx, fy, cy = INTRINSICS[0][0], INTRINSICS[0][2], INTRINSICS[1][1], INTRINSICS[1][2]
    step = DEPTH_SIZE // GRID  # nearest resize 24 -> 4 picks pixels 0, 6, 12, 18
    for index, name in enumerate(CAMERA_NAMES):
        pixels = (batch[f"observation.images.{name}"] - mean) / std
        features = tower(pixels, output_hidden_states=True).hidden_states[-2][
            :, 1:
        ]  # (2, 16, 32), CLS dropped
        z = batch[f"observation.depth.{name}"][:, 0]  # (2, 24, 24)
        camera = torch.stack([(u - cx) * z / fx, (v - cy) * z / fy, z, torch.ones_like(z)], dim=-1)
        world = (camera @ batch[f"observation.extrinsics.{name}"].transpose(1, 2)[:, None])[..., :3]
        xyz = world[:, ::step, ::step].reshape(2, GRID * GRID, 3)
        expected = mm_projector(features + position_mlp(xyz))
        patches = prefix[:, index * GRID**2 : (index + 1) * GRID**2]
        torch.testing.assert_close(patches, expected, atol=2e-5, rtol=1e-4)
    assert prefix_mask[:, : 2 * GRID**2].all()


def test_llava3d_actions_depend_on_depth_from_the_first_step(checkpoints):
    policy = checkpoint_policy(checkpoints, "llava3d-clip", **depth_config_fields())
    noise = fixed_noise(policy, seed=6)
    near = policy.predict_action_chunk(depth_batch(policy), noise=noise)
    far = policy.predict_action_chunk(depth_batch(policy, scale=2.0), noise=noise)
    assert (near - far).abs().max() > 1e-3
    # Without the 3D encoder the same weights ignore depth.
    flat = checkpoint_policy(
        checkpoints, "llava3d-clip", **depth_config_fields(), geometry_encoder="sinusoidal"
    )
    torch.testing.assert_close(
        flat.predict_action_chunk(depth_batch(flat), noise=noise),
        flat.predict_action_chunk(depth_batch(flat, scale=2.0), noise=noise),
        atol=1e-6,
        rtol=0,
    )


def test_llava3d_position_mlp_refuses_several_points_per_patch(checkpoints):
    with pytest.raises(
        ValueError, match="geometry_samples_per_patch_side > 1 needs geometry_encoder='sinusoidal'"
    ):
        checkpoint_policy(
            checkpoints, "llava3d-clip", **depth_config_fields(), geometry_samples_per_patch_side=2
        )


def test_llava3d_3d_encoder_unused_is_logged(checkpoints, caplog):
    caplog.set_level("WARNING", logger="lerobot_llava3d_fusion.model.network")
    checkpoint_policy(checkpoints, "llava3d-clip", **depth_config_fields())
    assert "3D position encoder" not in caplog.text
    checkpoint_policy(checkpoints, "llava3d-clip")  # geometry="none"
    assert "3D position encoder" in caplog.text and "unused with geometry='none'" in caplog.text
    caplog.clear()
    checkpoint_policy(checkpoints, "llava3d-clip", **depth_config_fields(), geometry_encoder="sinusoidal")
    assert "unused with geometry_encoder='sinusoidal'" in caplog.text


def test_llava3d_with_3d_encoder_survives_save_and_load(checkpoints, tmp_path):
    policy = checkpoint_policy(checkpoints, "llava3d-clip", **depth_config_fields())
    batch = depth_batch(policy)
    noise = fixed_noise(policy, seed=6)
    before = policy.predict_action_chunk(batch, noise=noise)
    policy.save_pretrained(tmp_path)
    torch.manual_seed(123)
    reloaded = Llava3DFusionPolicy.from_pretrained(tmp_path)
    assert reloaded.model.geometry_encoder.position_mlp.gate is None
    assert torch.equal(reloaded.predict_action_chunk(batch, noise=noise), before)


@pytest.mark.parametrize(
    ("fmt", "encoder", "pretrained"),
    [
        ("llava3d-clip", "llava3d_mlp", True),  # LLaVA-3D's own position MLP
        ("llava3d-clip", "sinusoidal", False),
        ("llava-llama-clip", "llava3d_mlp", False),  # the same MLP, new behind its gate
    ],
)
def test_train_expert_only_freezes_only_a_pretrained_geometry_encoder(checkpoints, fmt, encoder, pretrained):
    """A pretrained encoder is part of the frozen VLM, so nothing of the VLM stream is back-propagated;
    a new one trains (frozen, its zero-gated term would never switch geometry on)."""
    policy = checkpoint_policy(
        checkpoints,
        fmt,
        **depth_config_fields(),
        geometry_encoder=encoder,
        train_expert_only=True,
        expert_mode="separate",
    )
    batch = depth_batch(policy)
    policy.train()
    loss, _ = policy.forward(batch)
    loss.backward()
    parameters = dict(policy.model.geometry_encoder.named_parameters())
    inputs = policy._prepare_inputs(batch)
    prefix, _, _ = policy.model.embed_prefix(
        inputs.images, inputs.camera_geometry, inputs.lang_tokens, inputs.lang_mask
    )
    if pretrained:
        assert not any(p.requires_grad or p.grad is not None for p in parameters.values())
        assert not prefix.requires_grad  # the VLM stream is a constant for the backward pass
    else:
        assert all(p.requires_grad and p.grad is not None for p in parameters.values())
        assert parameters["position_mlp.gate"].grad.abs().sum() > 0
        assert prefix.requires_grad


def test_llava3d_mlp_on_other_backbones_starts_random_behind_the_gate(checkpoints):
    plain = checkpoint_policy(
        checkpoints, "llava-llama-clip", seed=0, **{**depth_config_fields(), "geometry": "none"}
    )
    policy = checkpoint_policy(
        checkpoints, "llava-llama-clip", seed=0, **depth_config_fields(), geometry_encoder="llava3d_mlp"
    )
    encoder = policy.model.geometry_encoder.position_mlp
    assert encoder.position_embedding_head[0].weight.shape == (VISION_SIZES["hidden_size"], 3)
    assert torch.equal(encoder.gate, torch.zeros(VISION_SIZES["hidden_size"]))
    missing, unexpected = policy.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("model.geometry_encoder.") for key in missing)
    batch = depth_batch(policy)
    noise = fixed_noise(policy, seed=6)
    reference = plain.predict_action_chunk(batch, noise=noise)
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=noise), reference, atol=1e-6, rtol=0)
    with torch.no_grad():
        encoder.gate.fill_(1.0)
    assert (policy.predict_action_chunk(batch, noise=noise) - reference).abs().max() > 1e-3


def test_llava3d_checkpoint_without_or_with_a_broken_3d_encoder(checkpoints, tmp_path):
    tower_dir = str(checkpoints["llava3d-clip"][1])
    tensors = {k: v for k, v in llava3d_tensors().items() if not k.startswith(LLAVA3D_POSITION_PREFIX)}
    vlm_dir = save_llava3d(tmp_path / "no-mlp", tensors)
    fields = dict(vlm_model_name=str(vlm_dir), vision_tower_name=tower_dir)
    Llava3DFusionPolicy(tiny_config(**fields))  # geometry="none": not needed
    with pytest.raises(ValueError, match="has no model.video_tower.video_tower.positional_embedding"):
        Llava3DFusionPolicy(tiny_config(**fields, **depth_config_fields()))
    tensors = llava3d_tensors()
    tensors.pop(LLAVA3D_POSITION_PREFIX + "position_embedding_head.1.bias")
    vlm_dir = save_llava3d(tmp_path / "partial-mlp", tensors)
    with pytest.raises(
        ValueError, match=r"3D position encoder weights.*missing.*position_embedding_head.1.bias"
    ):
        load_backbone(str(vlm_dir), load_weights=True, vision_tower_name=tower_dir)
