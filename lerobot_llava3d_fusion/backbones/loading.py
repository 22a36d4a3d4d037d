"""Vision-language backbone: vision tower + projector + LLM of a LLaVA-family checkpoint.

`load_backbone` returns the three parts of a LLaVA model (the language-model head is dropped: the
policy never decodes text) plus what the policy needs to feed it: the image size and normalisation,
the patch grid and the tokenizer. Supported `vlm_model_name`s (Hub id or local directory):

* checkpoints transformers loads natively, no remote code: `LlavaForConditionalGeneration`
  (LLaVA-1.5 style: Llama/Mistral LLM, CLIP/SigLIP tower) and `LlavaOnevisionForConditionalGeneration`
  (Qwen2 LLM, SigLIP tower);
* original LLaVA-3D checkpoints (`LlavaLlamaForCausalLM`): their LLM and projector weights are mapped
  into transformers' `LlamaModel` and `LlavaMultiModalProjector`; the vision tower comes from the
  CLIP/SigLIP checkpoint named by `vision_tower_name` (`llava3d_checkpoint.py`);
* `"tiny"`: a tiny random model built from code (SigLIP tower, Qwen2/Llama/Mistral LLM, byte-level
  tokenizer) for offline tests and demos.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from lerobot_llava3d_fusion.backbones.backbone import (
    Backbone,
    load_image_normalisation,
    read_checkpoint_config,
)
from lerobot_llava3d_fusion.backbones.llava3d import (
    LLAVA3D_ARCHITECTURES,
    LLAVA3D_MODEL_TYPES,
    load_llava3d_backbone,
    load_llava3d_tokenizer,
)
from lerobot_llava3d_fusion.configuration_llava3d_fusion import TINY_VLM_NAME
from lerobot_llava3d_fusion.model.fusion import check_decoder_contract

logger = logging.getLogger(__name__)

# LLaVA wrappers that transformers loads natively (no remote code), by config `model_type`.
LLAVA_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}


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


@dataclass(frozen=True)
class BackboneLayout:
    """One checkpoint layout the policy can load: how to recognise it and how to load it.

    To support another layout, write its loader (returning a `Backbone` whose LLM meets the decoder
    contract of `fusion.check_decoder_contract`) and add an entry to `BACKBONE_LAYOUTS`.
    """

    name: str
    description: str  # for the error listing what is supported
    recognises: Callable[[dict], bool]  # the checkpoint's config.json -> is it this layout?
    # (name, config.json, vision_tower_name=, load_weights=, dtype=) -> Backbone
    load: Callable[..., Backbone]
    load_tokenizer: Callable[[str, dict], PreTrainedTokenizerBase]
    has_own_vision_tower: bool = True


def _is_llava3d(config: dict) -> bool:
    # Original LLaVA codebases also name their config model_type "llava": the architecture decides.
    architectures = config.get("architectures") or []
    return any(arch in LLAVA3D_ARCHITECTURES for arch in architectures) or (
        config.get("model_type") in LLAVA3D_MODEL_TYPES
    )


def _load_llava3d(name: str, config: dict, *, vision_tower_name, load_weights, dtype) -> Backbone:
    return load_llava3d_backbone(
        name, config, vision_tower_name=vision_tower_name, load_weights=load_weights, dtype=dtype
    )


def _load_transformers_llava(name: str, config: dict, *, vision_tower_name, load_weights, dtype) -> Backbone:
    return load_transformers_llava_backbone(name, load_weights=load_weights, dtype=dtype)


BACKBONE_LAYOUTS = (
    BackboneLayout(
        name="llava3d",
        description=f"original LLaVA-3D (architectures {list(LLAVA3D_ARCHITECTURES)} or model_type in "
        f"{list(LLAVA3D_MODEL_TYPES)})",
        recognises=_is_llava3d,
        load=_load_llava3d,
        load_tokenizer=load_llava3d_tokenizer,
        has_own_vision_tower=False,
    ),
    BackboneLayout(
        name="transformers",
        description=f"transformers LLaVA (model_type in {sorted(LLAVA_MODEL_CLASSES)})",
        recognises=lambda config: config.get("model_type") in LLAVA_MODEL_CLASSES,
        load=_load_transformers_llava,
        load_tokenizer=lambda name, config: AutoTokenizer.from_pretrained(name),
    ),
)


def backbone_layout(name: str, config: dict) -> BackboneLayout:
    """The layout of the checkpoint whose config.json is `config` (`read_checkpoint_config`)."""
    for layout in BACKBONE_LAYOUTS:
        if layout.recognises(config):
            return layout
    raise ValueError(
        f"{name}: unsupported architecture (model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures') or []}); expected one of: "
        + "; ".join(layout.description for layout in BACKBONE_LAYOUTS)
        + "."
    )


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
    CLIP/SigLIP checkpoint of the vision tower, for layouts without their own (original LLaVA-3D).
    """
    if name == TINY_VLM_NAME:
        _reject_vision_tower_name(name, vision_tower_name)
        backbone = build_tiny_backbone(tiny_llm_type)
    else:
        config = read_checkpoint_config(name)
        layout = backbone_layout(name, config)
        if layout.has_own_vision_tower:
            _reject_vision_tower_name(name, vision_tower_name)
        backbone = layout.load(
            name, config, vision_tower_name=vision_tower_name, load_weights=load_weights, dtype=dtype
        )
    check_decoder_contract(backbone.language_model, name)
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
    return backbone_layout(name, config).load_tokenizer(name, config)


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
    model_cls = LLAVA_MODEL_CLASSES[config.model_type]
    if load_weights:
        model = model_cls.from_pretrained(name, dtype=dtype)
    else:
        model = model_cls(config).to(dtype)
    image_mean, image_std = load_image_normalisation(name)
    return backbone_from_llava(model, load_tokenizer(name), image_mean, image_std)


def backbone_from_llava(model: nn.Module, tokenizer, image_mean, image_std) -> Backbone:
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


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (split on whitespace and punctuation) plus
    <unk>/<pad>/<eos>: each known word is one token, as a real LLM tokenizer makes of common words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: index for index, word in enumerate(sorted(set(words)))}
    for special in ("<unk>", "<pad>", "<eos>"):
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def build_tiny_llava(
    llm_type: str = "qwen2",
    *,
    image_size: int = TINY_IMAGE_SIZE,
    patch_size: int = TINY_PATCH_SIZE,
    vision_hidden_size: int = 32,
    text_sizes: dict | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast]:
    """A small random LLaVA model (SigLIP tower + `llm_type` LLM) and its tokenizer.

    The defaults are the `"tiny"` preset; the size arguments build larger ones (e.g. the demo's).
    `tokenizer` (default: the byte-level `build_tiny_tokenizer`) needs a pad token; the vocabulary
    size follows it.
    """
    if llm_type not in TINY_LLM_CONFIGS:
        raise ValueError(f"tiny_llm_type must be one of {sorted(TINY_LLM_CONFIGS)}, got {llm_type!r}.")
    tokenizer = tokenizer or build_tiny_tokenizer()
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token (it also serves as the image token).")
    text_config = TINY_LLM_CONFIGS[llm_type](
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **(text_sizes or TINY_TEXT_SIZES)
    )
    vision_config = SiglipVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = siglip_llava_config(text_config, vision_config, image_token_id=tokenizer.pad_token_id)
    return LlavaForConditionalGeneration(config), tokenizer


def siglip_llava_config(
    text_config: PretrainedConfig, vision_config: SiglipVisionConfig, image_token_id: int
) -> LlavaConfig:
    """A LLaVA config over a SigLIP tower, whose last layer's patch tokens (no CLS) are all used."""
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
    )


def build_tiny_backbone(llm_type: str = "qwen2") -> Backbone:
    """The backbone of `build_tiny_llava` (SigLIP normalisation)."""
    model, tokenizer = build_tiny_llava(llm_type)
    return backbone_from_llava(model, tokenizer, *SIGLIP_MEAN_STD)
