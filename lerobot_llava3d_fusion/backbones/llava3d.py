"""Original LLaVA-3D checkpoints (LLaVA codebase layout, Llama LLM) mapped into stock transformers modules.

Their LLM weights go into a `LlamaModel`, their `mm_projector` into a `LlavaMultiModalProjector`
and the 3D position MLP of their video tower is handed to the policy's LLaVA-3D geometry encoder
(see `map_llava3d_key`); the vision tower comes from the CLIP/SigLIP checkpoint named by
`vision_tower_name`. Unknown or missing keys are errors; deliberately skipped keys are logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from lerobot_llava3d_fusion.backbones.backbone import (
    Backbone,
    _raise_on_bad_keys,
    load_image_normalisation,
    read_checkpoint_config,
    safetensors_files,
)

if TYPE_CHECKING:
    from lerobot_llava3d_fusion.configuration_llava3d_fusion import Llava3DFusionConfig

logger = logging.getLogger(__name__)


# Original LLaVA-3D checkpoints (LLaVA codebase layout, Llama LLM), recognised by config.json.
LLAVA3D_ARCHITECTURES = ("LlavaLlamaForCausalLM",)

LLAVA3D_MODEL_TYPES = ("llava_llama",)

# Fields of their config.json that define the Llama decoder; the first five are required.
LLAVA3D_REQUIRED_LLM_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

LLAVA3D_OPTIONAL_LLM_FIELDS = (
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)

LLAVA3D_PROJECTOR_TYPE = "mlp2x_gelu"

# Their checkpoint keys. LLM: "model.<LlamaModel key>"; projector: nn.Sequential(Linear, GELU, Linear)
# at "model.mm_projector.{0,2}", i.e. linear_1 / linear_2 of LlavaMultiModalProjector.
LLAVA3D_LLM_PREFIX = "model."

LLAVA3D_LLM_MODULES = ("embed_tokens.", "layers.", "norm.")

LLAVA3D_PROJECTOR_PREFIX = "model.mm_projector."

LLAVA3D_PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}

# The 3D position MLP of the video tower (SpatialAwareModule.positional_embedding):
# Sequential(Linear(3, C), LayerNorm(C), ReLU, Linear(C, C)) on the vision width C, whose output is added
# to the tower's patch features before mm_projector. Its keys keep the Sequential's indices
# ("position_embedding_head.{0,1,3}.{weight,bias}"), the layout of `Llava3DPositionMLP`.
LLAVA3D_POSITION_PREFIX = "model.video_tower.video_tower.positional_embedding."

LLAVA3D_POSITION_KEYS = tuple(
    f"position_embedding_head.{index}.{param}" for index in (0, 1, 3) for param in ("weight", "bias")
)

# Deliberately not loaded (logged): the text head (the policy never decodes text), the original's own
# vision tower (taken from `vision_tower_name` instead), the rest of its video tower (the 3D click
# prompt encoder, for point prompts), the anyres newline token (patches are used flat) and RoPE
# buffers older transformers saved (recomputed from rope_theta).
LLAVA3D_SKIPPED_PREFIXES = (
    "lm_head.",
    "model.vision_tower.",
    "model.video_tower.",
    "model.prompt_encoder.",
    "model.image_newline",
)

LLAVA3D_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)

# Vision towers by the model_type of their vision config; full image-text checkpoints work too.
VISION_TOWER_CLASSES = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}

TWO_TOWER_MODEL_TYPES = ("clip", "siglip")

# Vision towers whose first output token is a CLS token (LLaVA's "patch" feature drops it).
CLS_TOKEN_TOWERS = ("clip_vision_model",)


def load_llava3d_backbone(
    name: str, config: dict, *, vision_tower_name: str | None, load_weights: bool, dtype: torch.dtype
) -> Backbone:
    """An original LLaVA-3D checkpoint (`config`: its config.json): Llama LLM + mlp2x_gelu projector,
    vision tower from `vision_tower_name`."""
    if vision_tower_name is None:
        raise ValueError(
            f"{name} is an original LLaVA-3D checkpoint, which does not carry a loadable vision tower: set "
            f"vision_tower_name to its CLIP/SigLIP checkpoint (this one was trained with "
            f"{config.get('mm_vision_tower', 'an unrecorded tower')!r})."
        )
    projector_type = config.get("mm_projector_type", "linear")  # the LLaVA codebase's default
    if projector_type != LLAVA3D_PROJECTOR_TYPE:
        raise ValueError(
            f"{name}: mm_projector_type {projector_type!r} is not supported; expected {LLAVA3D_PROJECTOR_TYPE!r}."
        )
    vision_tower = load_vision_tower(vision_tower_name, load_weights=load_weights, dtype=dtype)
    vision_config = vision_tower.config
    _check_projector_input(name, config, vision_tower_name, vision_config)
    llava_config = LlavaConfig(
        vision_config=vision_config.to_dict(),  # a copy: LlavaConfig resets its sub-configs' attention backend
        text_config=llama_config_from_llava3d(name, config),
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=_llava3d_select_strategy(name, config, vision_config),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    position_state = None
    if load_weights:
        language_model, projector, position_state = load_llava3d_weights(name, llava_config, dtype)
    else:
        language_model = LlamaModel(llava_config.text_config).to(dtype)
        projector = LlavaMultiModalProjector(llava_config).to(dtype)
    image_mean, image_std = load_image_normalisation(vision_tower_name)
    return Backbone(
        vision_tower=vision_tower,
        projector=projector,
        language_model=language_model,
        tokenizer=load_llava3d_tokenizer(name, config),
        vision_feature_layer=llava_config.vision_feature_layer,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        image_size=vision_config.image_size,
        patch_size=vision_config.patch_size,
        image_mean=image_mean,
        image_std=image_std,
        is_llava3d=True,
        position_encoder_state=position_state,
    )


def llama_config_from_llava3d(name: str, config: dict) -> LlamaConfig:
    """The stock LlamaConfig of the decoder described by an original LLaVA-3D config.json."""
    missing = [field for field in LLAVA3D_REQUIRED_LLM_FIELDS if field not in config]
    if missing:
        raise ValueError(
            f"{name}: config.json lacks {missing}; expected the Llama fields {LLAVA3D_REQUIRED_LLM_FIELDS}."
        )
    fields = LLAVA3D_REQUIRED_LLM_FIELDS + LLAVA3D_OPTIONAL_LLM_FIELDS
    return LlamaConfig(**{field: config[field] for field in fields if field in config})


def _llava3d_select_strategy(name: str, config: dict, vision_config: PretrainedConfig) -> str:
    """LLaVA's mm_vision_select_feature ("patch" / "cls_patch") as a transformers select strategy."""
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ValueError(f"{name}: mm_vision_select_feature {feature!r}; expected 'patch' or 'cls_patch'.")
    # "patch" drops the CLS token, which only CLIP towers have (a SigLIP tower outputs patches only).
    has_cls = vision_config.model_type in CLS_TOKEN_TOWERS
    return "default" if feature == "patch" and has_cls else "full"


def _check_projector_input(
    name: str, config: dict, vision_tower_name: str, vision_config: PretrainedConfig
) -> None:
    """The projector was trained on features of `mm_hidden_size`: the tower must produce that width."""
    expected = config.get("mm_hidden_size")
    if expected is not None and expected != vision_config.hidden_size:
        raise ValueError(
            f"vision_tower_name={vision_tower_name!r} has hidden size {vision_config.hidden_size}, but the "
            f"projector of {name} expects mm_hidden_size={expected} (its tower: {config.get('mm_vision_tower')!r})."
        )


def load_vision_tower(name: str, *, load_weights: bool, dtype: torch.dtype) -> PreTrainedModel:
    """A CLIP/SigLIP vision tower (from a vision-only or a full CLIP/SigLIP checkpoint)."""
    read_checkpoint_config(name)  # a clear error for a missing directory / unknown Hub id
    config = AutoConfig.from_pretrained(name)
    vision_config = config.vision_config if config.model_type in TWO_TOWER_MODEL_TYPES else config
    tower_cls = VISION_TOWER_CLASSES.get(vision_config.model_type)
    if tower_cls is None:
        raise ValueError(
            f"vision_tower_name={name!r} is a {config.model_type!r} checkpoint; expected a CLIP or SigLIP "
            f"vision tower (model_type in {sorted(TWO_TOWER_MODEL_TYPES + tuple(VISION_TOWER_CLASSES))})."
        )
    if not load_weights:
        return tower_cls(vision_config).to(dtype)
    tower, info = tower_cls.from_pretrained(name, config=vision_config, dtype=dtype, output_loading_info=True)
    # A full CLIP/SigLIP checkpoint also holds the text tower: unexpected keys are expected.
    _raise_on_bad_keys(
        name,
        "vision tower",
        missing=info["missing_keys"],
        mismatched=[key for key, *_ in info["mismatched_keys"]],
    )
    return tower


def load_llava3d_weights(
    name: str, llava_config: LlavaConfig, dtype: torch.dtype
) -> tuple[LlamaModel, nn.Module, dict[str, Tensor] | None]:
    """The LLM and projector of an original LLaVA-3D checkpoint, in transformers modules, and the
    state dict of its 3D position MLP (None when the checkpoint has none).

    Keys the modules need but the checkpoint lacks, and checkpoint keys they do not have, raise.
    """
    llm_state, projector_state, position_state = read_llava3d_state_dicts(name)
    language_model, info = LlamaModel.from_pretrained(
        None, config=llava_config.text_config, state_dict=llm_state, dtype=dtype, output_loading_info=True
    )
    _raise_on_bad_keys(
        name,
        "LLM",
        missing=info["missing_keys"],
        unknown=info["unexpected_keys"],
        mismatched=[key for key, *_ in info["mismatched_keys"]],
    )
    projector = LlavaMultiModalProjector(llava_config)
    result = projector.load_state_dict(projector_state, strict=False)
    _raise_on_bad_keys(name, "projector", missing=result.missing_keys, unknown=result.unexpected_keys)
    if position_state:
        _raise_on_bad_keys(
            name,
            "3D position encoder",
            missing=set(LLAVA3D_POSITION_KEYS) - set(position_state),
            unknown=set(position_state) - set(LLAVA3D_POSITION_KEYS),
        )
    return language_model, projector.to(dtype), position_state or None


def read_llava3d_state_dicts(
    name: str,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """(LlamaModel state dict, LlavaMultiModalProjector state dict, 3D position MLP state dict) from an
    original LLaVA-3D checkpoint; the last is empty when the checkpoint has no such MLP.

    Every tensor is either mapped (`map_llava3d_key`) or deliberately skipped (logged, never read);
    any other key raises.
    """
    states = {"language_model": {}, "projector": {}, "position_encoder": {}}
    skipped, unknown = Counter(), []
    for file in safetensors_files(name):
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():
                mapped = map_llava3d_key(key)
                if mapped is None:
                    unknown.append(key)
                elif mapped[0] == "skipped":
                    skipped[mapped[1]] += 1
                else:
                    part, target_key = mapped
                    states[part][target_key] = reader.get_tensor(key)
    _raise_on_bad_keys(name, "checkpoint", unknown=unknown)
    if skipped:
        logger.info(
            "%s: skipped tensors the policy does not use (count per key pattern): %s", name, dict(skipped)
        )
    return states["language_model"], states["projector"], states["position_encoder"]


def map_llava3d_key(key: str) -> tuple[str, str] | None:
    """Where an original LLaVA-3D tensor goes.

    -> ("language_model", LlamaModel key) for "model.{embed_tokens,layers,norm}.*" (prefix stripped);
       ("projector", LlavaMultiModalProjector key) for "model.mm_projector.{0,2}.*" (-> linear_{1,2});
       ("position_encoder", "position_embedding_head.*") for the video tower's 3D position MLP;
       ("skipped", the matched prefix or suffix) for tensors deliberately not loaded;
       None for an unknown key.
    """
    if key.startswith(LLAVA3D_POSITION_PREFIX):
        inner = key.removeprefix(LLAVA3D_POSITION_PREFIX)
        return ("position_encoder", inner) if inner in LLAVA3D_POSITION_KEYS else None
    for pattern in LLAVA3D_SKIPPED_SUFFIXES:
        if key.endswith(pattern):
            return "skipped", pattern
    for pattern in LLAVA3D_SKIPPED_PREFIXES:
        if key.startswith(pattern):
            return "skipped", pattern
    if key.startswith(LLAVA3D_PROJECTOR_PREFIX):
        index, _, param = key.removeprefix(LLAVA3D_PROJECTOR_PREFIX).partition(".")
        layer = LLAVA3D_PROJECTOR_LAYERS.get(index)
        return ("projector", f"{layer}.{param}") if layer else None
    inner = key.removeprefix(LLAVA3D_LLM_PREFIX)
    if key.startswith(LLAVA3D_LLM_PREFIX) and inner.startswith(LLAVA3D_LLM_MODULES):
        return "language_model", inner
    return None


def load_llava3d_tokenizer(name: str, config: dict) -> PreTrainedTokenizerBase:
    """AutoConfig does not know the original's model_type: tell AutoTokenizer its LLM is a Llama."""
    return AutoTokenizer.from_pretrained(name, config=llama_config_from_llava3d(name, config))


def load_llava3d_position_mlp(encoder: nn.Module, backbone: Backbone, config: Llava3DFusionConfig) -> None:
    """Put an original LLaVA-3D checkpoint's pretrained 3D position MLP into `encoder`, when loaded."""
    if not backbone.is_llava3d or not config.load_vlm_weights:
        return  # other backbones start from random weights behind the gate; random init keeps them random
    state = backbone.position_encoder_state
    if state is None:
        raise ValueError(
            f"{config.vlm_model_name}: geometry_encoder='llava3d_mlp' loads the checkpoint's 3D position "
            f"encoder, but it has no {LLAVA3D_POSITION_PREFIX}position_embedding_head.* tensors; use "
            "geometry_encoder='sinusoidal' for a checkpoint without one."
        )
    expected = {
        key: tuple(value.shape) for key, value in encoder.position_embedding_head.state_dict().items()
    }
    found = {key.removeprefix("position_embedding_head."): tuple(value.shape) for key, value in state.items()}
    if found != expected:
        raise ValueError(
            f"{config.vlm_model_name}: its 3D position encoder has shapes {found}, expected {expected} for a "
            f"vision width of {backbone.feature_width} (check vision_tower_name)."
        )
    encoder.load_state_dict(state)
