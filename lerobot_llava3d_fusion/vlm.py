"""Vision-language backbone: vision tower + projector + LLM of a LLaVA-family checkpoint.

`load_backbone` returns the three parts of a transformers LLaVA model (the language-model head is
dropped: the policy never decodes text) plus what the policy needs to feed it: the image size and
normalisation, the patch grid and the tokenizer. `vlm_model_name="tiny"` builds a tiny random
model from code (SigLIP tower, Qwen2/Llama/Mistral LLM, byte-level tokenizer) for offline use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from .configuration_llava3d_fusion import TINY_VLM_NAME

logger = logging.getLogger(__name__)

# LLaVA wrappers that transformers loads natively (no remote code), by config `model_type`.
LLAVA_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}
# Decoder families whose layers the fusion stack drives directly (same attention/MLP layout).
SUPPORTED_LLM_TYPES = ("llama", "mistral", "qwen2")

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

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


class ImageEncoder(nn.Module):
    """Images (N, 3, S, S) normalised for the tower -> projected patch tokens (N, P, D_llm)."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, feature_layer, select_strategy: str):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy

    def forward(self, pixel_values: Tensor) -> Tensor:
        # Same feature selection as transformers' LlavaModel.get_image_features, without its
        # per-image list output: hidden states of the chosen layer(s), CLS dropped for "default".
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        features = [outputs.hidden_states[i] for i in layers]
        if self.select_strategy == "default":
            features = [f[:, 1:] for f in features]
        return self.projector(torch.cat(features, dim=-1))


def load_backbone(
    name: str,
    *,
    load_weights: bool,
    num_layers: int = -1,
    tiny_llm_type: str = "qwen2",
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Build the backbone from a Hub id / local directory of a LLaVA checkpoint, or `"tiny"`."""
    if name == TINY_VLM_NAME:
        model, tokenizer = build_tiny_llava(tiny_llm_type)
        image_mean, image_std = SIGLIP_MEAN_STD
    else:
        model, tokenizer, image_mean, image_std = _load_llava(name, load_weights=load_weights, dtype=dtype)

    base = model.model
    llm_type = base.language_model.config.model_type
    if llm_type not in SUPPORTED_LLM_TYPES:
        raise ValueError(
            f"{name}: LLM type {llm_type!r} is not supported; expected one of {SUPPORTED_LLM_TYPES}."
        )
    _keep_first_layers(base.language_model, num_layers)
    vision_config = model.config.vision_config
    return Backbone(
        vision_tower=base.vision_tower,
        projector=base.multi_modal_projector,
        language_model=base.language_model.to(dtype),
        tokenizer=tokenizer,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_size=vision_config.image_size,
        patch_size=vision_config.patch_size,
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with `vlm_model_name` (used by the processor)."""
    if name == TINY_VLM_NAME:
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _keep_first_layers(language_model: nn.Module, num_layers: int) -> None:
    total = len(language_model.layers)
    if num_layers <= 0 or num_layers == total:
        return
    if num_layers > total:
        raise ValueError(f"num_vlm_layers={num_layers} but the LLM has only {total} layers.")
    language_model.layers = language_model.layers[:num_layers]
    language_model.config.num_hidden_layers = num_layers


def _load_llava(name: str, *, load_weights: bool, dtype: torch.dtype):
    if not Path(name).is_dir():
        logger.info("Loading %s from the Hugging Face Hub (or its local cache).", name)
    config = AutoConfig.from_pretrained(name)
    model_cls = LLAVA_MODEL_CLASSES.get(config.model_type)
    if model_cls is None:
        raise ValueError(
            f"{name}: unsupported architecture {config.model_type!r}; expected a LLaVA-family checkpoint "
            f"with model_type in {sorted(LLAVA_MODEL_CLASSES)}."
        )
    if load_weights:
        model = model_cls.from_pretrained(name, dtype=dtype)
    else:
        model = model_cls(config).to(dtype)
    tokenizer = load_tokenizer(name)
    try:
        image_processor = AutoImageProcessor.from_pretrained(name)
        image_mean, image_std = image_processor.image_mean, image_processor.image_std
    except OSError:
        logger.warning("%s has no image processor config; assuming SigLIP normalisation.", name)
        image_mean, image_std = SIGLIP_MEAN_STD
    return model, tokenizer, image_mean, image_std


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


def build_tiny_llava(llm_type: str = "qwen2") -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast]:
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
