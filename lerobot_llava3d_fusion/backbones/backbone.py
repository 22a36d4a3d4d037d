"""The parts of a LLaVA-family model the policy uses, and reading a checkpoint's files.

`Backbone` holds the vision tower, projector, LLM and tokenizer with what the policy needs to feed
them (image size and normalisation, patch grids); `ImageEncoder` turns images into projected patch
tokens. The loaders that produce a `Backbone` live in `vlm.py` (transformers LLaVA models, tiny
models) and `llava3d_checkpoint.py` (original LLaVA-3D checkpoints).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from transformers import AutoImageProcessor, PreTrainedTokenizerBase
from transformers.utils import cached_file
from transformers.utils.hub import get_checkpoint_shard_files

logger = logging.getLogger(__name__)


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
    # An original LLaVA-3D checkpoint, and (when its weights were loaded) the state dict of its 3D
    # position MLP ("position_embedding_head.{0,1,3}.{weight,bias}", see llava3d_checkpoint.py).
    is_llava3d: bool = False
    position_encoder_state: dict[str, Tensor] | None = None

    @property
    def feature_grid(self) -> tuple[int, int]:
        """(rows, cols) of the vision tower's patches."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def feature_width(self) -> int:
        """Width C of the tower features the projector reads (several selected layers are concatenated)."""
        layers = 1 if isinstance(self.vision_feature_layer, int) else len(self.vision_feature_layer)
        return self.vision_tower.config.hidden_size * layers

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the image tokens the policy sees, i.e. after pooling."""
        rows, cols = self.feature_grid
        return rows // self.image_pooling, cols // self.image_pooling


def vision_transformer(tower: nn.Module) -> nn.Module:
    """The module of a CLIP/SigLIP vision tower that holds its `embeddings` and `encoder`: the tower's
    `vision_model` up to transformers 5.5, the tower itself from 5.24 on (checkpoints of either layout
    load under the other, `checkpoint.KEY_MIGRATIONS`)."""
    return getattr(tower, "vision_model", tower)


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
        return self.project(self.features(pixel_values))

    @classmethod
    def of(cls, backbone: Backbone) -> ImageEncoder:
        """The image encoder of `backbone`'s tower and projector, with its feature selection and pooling."""
        return cls(
            backbone.vision_tower,
            backbone.projector,
            backbone.vision_feature_layer,
            backbone.vision_feature_select_strategy,
            feature_grid=backbone.feature_grid,
            pooling=backbone.image_pooling,
        )

    def features(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) -> the tower's patch features (N, rows * cols, C), before the projector."""
        # Same feature selection as transformers' LlavaModel.get_image_features, without its
        # per-image list output: hidden states of the chosen layer(s), CLS dropped for "default".
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        features = [outputs.hidden_states[i] for i in layers]
        if self.select_strategy == "default":
            features = [f[:, 1:] for f in features]
        return torch.cat(features, dim=-1)

    def project(self, features: Tensor) -> Tensor:
        """(N, rows * cols, C) tower features -> (N, P, D_llm) pooled patch tokens."""
        return self.pool(self.projector(features))

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
