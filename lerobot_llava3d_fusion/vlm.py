"""Vision-language backbone: vision tower + projector + LLM of a LLaVA-family checkpoint.

`load_backbone` returns the three parts of a LLaVA model (the language-model head is dropped: the
policy never decodes text) plus what the policy needs to feed it: the image size and normalisation,
the patch grid and the tokenizer. Supported `vlm_model_name`s (Hub id or local directory):

* checkpoints transformers loads natively, no remote code: `LlavaForConditionalGeneration`
  (LLaVA-1.5 style: Llama/Mistral LLM, CLIP/SigLIP tower) and `LlavaOnevisionForConditionalGeneration`
  (Qwen2 LLM, SigLIP tower);
* original LLaVA-3D checkpoints (`LlavaLlamaForCausalLM`): their LLM and projector weights are mapped
  into transformers' `LlamaModel` and `LlavaMultiModalProjector`; the vision tower comes from the
  CLIP/SigLIP checkpoint named by `vision_tower_name` (see `map_llava3d_key` for the key mapping);
* `"tiny"`: a tiny random model built from code (SigLIP tower, Qwen2/Llama/Mistral LLM, byte-level
  tokenizer) for offline tests and demos.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from safetensors import safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import cached_file
from transformers.utils.hub import get_checkpoint_shard_files

from .configuration_llava3d_fusion import TINY_VLM_NAME

logger = logging.getLogger(__name__)

# LLaVA wrappers that transformers loads natively (no remote code), by config `model_type`.
LLAVA_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}
# Decoder families whose layers the fusion stack drives directly (same attention/MLP layout).
SUPPORTED_LLM_TYPES = ("llama", "mistral", "qwen2")

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
# Deliberately not loaded (logged): the text head (the policy never decodes text), the original's own
# vision tower (taken from `vision_tower_name` instead), its 3D video tower and prompt encoder
# (3D-specific modules this policy replaces with its own geometry encoding), the anyres newline token
# (patches are used flat) and RoPE buffers older transformers saved (recomputed from rope_theta).
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

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_TEXT_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
)
TINY_LLM_CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}
SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass
class Backbone:
    """The parts of a LLaVA model the policy uses."""

    vision_tower: nn.Module
    projector: nn.Module
    language_model: nn.Module  # transformers base decoder model (LlamaModel, Qwen2Model, ...)
    tokenizer: PreTrainedTokenizerBase
    vision_feature_layer: int | list[int]
    vision_feature_select_strategy: str  # "default" drops the CLS token, "full" keeps all
    image_size: int
    patch_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    image_pooling: int = 1  # patch tokens are averaged over image_pooling x image_pooling neighbourhoods

    @property
    def feature_grid(self) -> tuple[int, int]:
        """(rows, cols) of the vision tower's patches."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image tokens the policy sees, i.e. after pooling."""
        rows, cols = self.feature_grid
        return rows // self.image_pooling, cols // self.image_pooling


class ImageEncoder(nn.Module):
    """Images (N, 3, S, S) normalised for the tower -> projected patch tokens (N, P, D_llm).

    P = (rows // pooling) * (cols // pooling) for the tower's `feature_grid` of (rows, cols) patches,
    tokens in row-major order of the (pooled) grid.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        projector: nn.Module,
        feature_layer: int | list[int],
        select_strategy: str,
        feature_grid: tuple[int, int],
        pooling: int = 1,
    ):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self.feature_grid = feature_grid
        self.pooling = pooling

    def forward(self, pixel_values: Tensor) -> Tensor:
        # Same feature selection as transformers' LlavaModel.get_image_features, without its
        # per-image list output: hidden states of the chosen layer(s), CLS dropped for "default".
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        features = [outputs.hidden_states[i] for i in layers]
        if self.select_strategy == "default":
            features = [f[:, 1:] for f in features]
        return self.pool(self.projector(torch.cat(features, dim=-1)))

    def pool(self, tokens: Tensor) -> Tensor:
        """(N, rows * cols, D) -> (N, rows/k * cols/k, D): mean over k x k patch neighbourhoods."""
        rows, cols = self.feature_grid
        if tokens.shape[1] != rows * cols:
            raise ValueError(
                f"the vision tower gave {tokens.shape[1]} patch tokens, expected a {rows}x{cols} grid "
                f"({rows * cols}); check vision_feature_select_strategy ({self.select_strategy!r})."
            )
        if self.pooling == 1:
            return tokens
        grid = tokens.transpose(1, 2).unflatten(2, (rows, cols))  # (N, D, rows, cols)
        return F.avg_pool2d(grid, self.pooling).flatten(2).transpose(1, 2)


def load_backbone(
    name: str,
    *,
    load_weights: bool,
    num_layers: int = -1,
    image_pooling: int = 1,
    vision_tower_name: str | None = None,
    tiny_llm_type: str = "qwen2",
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Build the backbone from a Hub id / local directory of a LLaVA checkpoint, or `"tiny"`.

    `load_weights=False` builds the checkpoint's architecture (from its config.json) with random
    weights; `num_layers > 0` keeps the first `num_layers` LLM layers; `vision_tower_name` is the
    CLIP/SigLIP checkpoint of the vision tower, for original LLaVA-3D checkpoints only.
    """
    if name == TINY_VLM_NAME:
        _reject_vision_tower_name(name, vision_tower_name)
        backbone = build_tiny_backbone(tiny_llm_type)
    else:
        config = read_checkpoint_config(name)
        if checkpoint_format(name, config) == "llava3d":
            backbone = load_llava3d_backbone(
                name, config, vision_tower_name=vision_tower_name, load_weights=load_weights, dtype=dtype
            )
        else:
            _reject_vision_tower_name(name, vision_tower_name)
            backbone = load_transformers_llava_backbone(name, load_weights=load_weights, dtype=dtype)
    _keep_first_layers(backbone.language_model, num_layers)
    _check_pooling(backbone, image_pooling)
    backbone.image_pooling = image_pooling
    backbone.language_model.to(dtype)
    return backbone


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with `vlm_model_name` (used by the processor)."""
    if name == TINY_VLM_NAME:
        return build_tiny_tokenizer()
    config = read_checkpoint_config(name)
    if checkpoint_format(name, config) == "llava3d":
        # AutoConfig does not know the original's model_type: tell AutoTokenizer its LLM is a Llama.
        return AutoTokenizer.from_pretrained(name, config=llama_config_from_llava3d(name, config))
    return AutoTokenizer.from_pretrained(name)


# ------------------------------------------------------------------------------ checkpoint format


def read_checkpoint_config(name: str) -> dict:
    """The config.json of a Hub id or local checkpoint directory, as a dict."""
    expected = "expected a local checkpoint directory containing config.json, or a Hugging Face Hub model id"
    try:
        config_file = cached_file(name, "config.json")
    except OSError as error:  # no such directory, invalid or unreachable Hub id
        raise FileNotFoundError(f"cannot read the config.json of {name!r}: {expected} ({error}).") from error
    if config_file is None:  # an existing directory without config.json
        raise FileNotFoundError(f"{name!r} has no config.json: {expected}.")
    with open(config_file) as file:
        return json.load(file)


def checkpoint_format(name: str, config: dict) -> str:
    """ "transformers" (LLaVA / LLaVA-OneVision saved by transformers) or "llava3d" (original layout).

    `config` is the checkpoint's config.json (`read_checkpoint_config`).
    """
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    # Original LLaVA codebases also name their config model_type "llava": the architecture decides.
    if any(arch in LLAVA3D_ARCHITECTURES for arch in architectures) or model_type in LLAVA3D_MODEL_TYPES:
        return "llava3d"
    if model_type in LLAVA_MODEL_CLASSES:
        return "transformers"
    raise ValueError(
        f"{name}: unsupported architecture (model_type={model_type!r}, architectures={architectures}); "
        f"expected a transformers LLaVA checkpoint (model_type in {sorted(LLAVA_MODEL_CLASSES)}) or an "
        f"original LLaVA-3D checkpoint (architectures {list(LLAVA3D_ARCHITECTURES)}, "
        f"model_type in {list(LLAVA3D_MODEL_TYPES)})."
    )


def _reject_vision_tower_name(name: str, vision_tower_name: str | None) -> None:
    if vision_tower_name is not None:
        raise ValueError(
            f"vision_tower_name={vision_tower_name!r} is only used for original LLaVA-3D checkpoints; "
            f"{name!r} brings its own vision tower: set vision_tower_name=None."
        )


# --------------------------------------------------------------------- transformers LLaVA models


def load_transformers_llava_backbone(name: str, *, load_weights: bool, dtype: torch.dtype) -> Backbone:
    """A checkpoint of a LLaVA wrapper transformers loads natively (everything comes from it)."""
    config = AutoConfig.from_pretrained(name)
    llm_type = config.text_config.model_type
    if llm_type not in SUPPORTED_LLM_TYPES:
        raise ValueError(
            f"{name}: LLM type {llm_type!r} is not supported; expected one of {SUPPORTED_LLM_TYPES}."
        )
    model_cls = LLAVA_MODEL_CLASSES[config.model_type]
    if load_weights:
        model = model_cls.from_pretrained(name, dtype=dtype)
    else:
        model = model_cls(config).to(dtype)
    image_mean, image_std = load_image_normalisation(name)
    return _backbone_from_llava(model, load_tokenizer(name), image_mean, image_std)


def _backbone_from_llava(model: nn.Module, tokenizer, image_mean, image_std) -> Backbone:
    """Split a transformers LLaVA(-OneVision) model into the parts the policy uses."""
    base, config = model.model, model.config
    return Backbone(
        vision_tower=base.vision_tower,
        projector=base.multi_modal_projector,
        language_model=base.language_model,
        tokenizer=tokenizer,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_size=config.vision_config.image_size,
        patch_size=config.vision_config.patch_size,
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
    )


def load_image_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel from the image processor config (preprocessor_config.json) of `name`."""
    try:
        image_processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{name}: no usable image processor config; expected a preprocessor_config.json with "
            f"image_mean and image_std ({error})."
        ) from error
    return tuple(image_processor.image_mean), tuple(image_processor.image_std)


# ---------------------------------------------------------------------- original LLaVA-3D layout


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
    if load_weights:
        language_model, projector = load_llava3d_weights(name, llava_config, dtype)
    else:
        language_model = LlamaModel(llava_config.text_config).to(dtype)
        projector = LlavaMultiModalProjector(llava_config).to(dtype)
    image_mean, image_std = load_image_normalisation(vision_tower_name)
    return Backbone(
        vision_tower=vision_tower,
        projector=projector,
        language_model=language_model,
        tokenizer=load_tokenizer(name),
        vision_feature_layer=llava_config.vision_feature_layer,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        image_size=vision_config.image_size,
        patch_size=vision_config.patch_size,
        image_mean=image_mean,
        image_std=image_std,
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
) -> tuple[LlamaModel, nn.Module]:
    """The LLM and projector of an original LLaVA-3D checkpoint, in transformers modules.

    Keys the modules need but the checkpoint lacks, and checkpoint keys they do not have, raise.
    """
    llm_state, projector_state = read_llava3d_state_dicts(name)
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
    return language_model, projector.to(dtype)


def read_llava3d_state_dicts(name: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(LlamaModel state dict, LlavaMultiModalProjector state dict) from an original LLaVA-3D checkpoint.

    Every tensor is either mapped (`map_llava3d_key`) or deliberately skipped (logged, never read);
    any other key raises.
    """
    states = {"language_model": {}, "projector": {}}
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
    return states["language_model"], states["projector"]


def map_llava3d_key(key: str) -> tuple[str, str] | None:
    """Where an original LLaVA-3D tensor goes.

    -> ("language_model", LlamaModel key) for "model.{embed_tokens,layers,norm}.*" (prefix stripped);
       ("projector", LlavaMultiModalProjector key) for "model.mm_projector.{0,2}.*" (-> linear_{1,2});
       ("skipped", the matched prefix or suffix) for tensors deliberately not loaded;
       None for an unknown key.
    """
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


def safetensors_files(name: str) -> list[str]:
    """Local paths of a checkpoint's safetensors weights: model.safetensors or the shards of its index."""
    single = cached_file(name, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    if single is not None:
        return [single]
    index = cached_file(name, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is None:
        raise FileNotFoundError(
            f"{name}: no model.safetensors or model.safetensors.index.json; expected safetensors weights "
            "(pickled pytorch_model.bin checkpoints are not loaded)."
        )
    shard_files, _ = get_checkpoint_shard_files(name, index)
    return shard_files


def _raise_on_bad_keys(name: str, part: str, *, missing=(), unknown=(), mismatched=()) -> None:
    """One error listing (the first ten of) each kind of key problem met loading `part`, if any."""
    problems = {
        "missing": sorted(missing),
        "unknown (not mapped, not deliberately skipped)": sorted(unknown),
        "with mismatched shapes": sorted(mismatched),
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        details = "; ".join(
            f"{kind}: {keys[:10]}{' ...' if len(keys) > 10 else ''}" for kind, keys in problems.items()
        )
        raise ValueError(f"{name}: cannot load the {part} weights. Keys {details}.")


# --------------------------------------------------------------------------- layers and pooling


def _keep_first_layers(language_model: nn.Module, num_layers: int) -> None:
    total = len(language_model.layers)
    if num_layers <= 0 or num_layers == total:
        return
    if num_layers > total:
        raise ValueError(f"num_vlm_layers={num_layers} but the LLM has only {total} layers.")
    language_model.layers = language_model.layers[:num_layers]
    language_model.config.num_hidden_layers = num_layers


def _check_pooling(backbone: Backbone, image_pooling: int) -> None:
    rows, cols = backbone.feature_grid
    if image_pooling < 1 or rows % image_pooling or cols % image_pooling:
        divisors = [k for k in range(1, rows + 1) if rows % k == 0 and cols % k == 0]
        raise ValueError(
            f"image_pooling={image_pooling} must divide the {rows}x{cols} patch grid "
            f"({backbone.image_size}px images, {backbone.patch_size}px patches); expected one of {divisors}."
        )


# ------------------------------------------------------------------------------------ tiny model


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built from code: 256 byte tokens + pad/eos, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def build_tiny_llava(
    llm_type: str = "qwen2",
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast]:
    """A tiny random LLaVA model (SigLIP tower + `llm_type` LLM) and its tokenizer."""
    if llm_type not in TINY_LLM_CONFIGS:
        raise ValueError(f"tiny_llm_type must be one of {sorted(TINY_LLM_CONFIGS)}, got {llm_type!r}.")
    tokenizer = build_tiny_tokenizer()
    text_config = TINY_LLM_CONFIGS[llm_type](
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_TEXT_SIZES
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.pad_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
    )
    return LlavaForConditionalGeneration(config), tokenizer


def build_tiny_backbone(llm_type: str = "qwen2") -> Backbone:
    """The backbone of `build_tiny_llava` (SigLIP normalisation)."""
    model, tokenizer = build_tiny_llava(llm_type)
    return _backbone_from_llava(model, tokenizer, *SIGLIP_MEAN_STD)
