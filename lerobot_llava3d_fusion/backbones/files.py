"""The backbone's architecture files that a policy checkpoint carries, so that it loads anywhere.

`model.safetensors` holds every weight of the policy, but building the modules those weights go
into needs the backbone's `config.json`, its image-processor settings and its tokenizer. A saved
policy keeps them in `backbone/` next to its weights (and in `backbone/vision_tower/` for original
LLaVA-3D checkpoints, whose vision tower comes from a second checkpoint), so
`--policy.path=<dir or user/repo>` works on a machine that has only that checkpoint, and the
directory or Hub repo the backbone first came from may move or disappear.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import PreTrainedTokenizerBase
from transformers.utils import cached_file

from lerobot_llava3d_fusion.configuration_llava3d_fusion import TINY_VLM_NAME, Llava3DFusionConfig

logger = logging.getLogger(__name__)

BACKBONE_DIR = "backbone"
VISION_TOWER_DIR = "vision_tower"
# What building the architecture reads besides the tokenizer (saved with `save_pretrained`).
ARCHITECTURE_FILES = ("config.json", "preprocessor_config.json")
# The arguments of `from_pretrained` that say how to reach a Hub repo.
HUB_ARGUMENTS = ("revision", "cache_dir", "force_download", "token", "local_files_only", "proxies")


@dataclass(frozen=True)
class BackboneSource:
    """Where the backbone's architecture files are read: `vlm_model_name` / `vision_tower_name` for a
    new policy, the `backbone/` folder of the checkpoint for a loaded one."""

    vlm: str
    vision_tower: str | None = None

    @classmethod
    def from_config(cls, config: Llava3DFusionConfig) -> BackboneSource:
        return cls(config.vlm_model_name, config.vision_tower_name)

    @property
    def built_from_code(self) -> bool:
        """The tiny backbone needs no files."""
        return self.vlm == TINY_VLM_NAME


def save_backbone_files(
    source: BackboneSource, tokenizer: PreTrainedTokenizerBase, directory: str | Path
) -> None:
    """Write `directory/backbone/` (config, image-processor settings, tokenizer) and, for a separate
    vision tower, `directory/backbone/vision_tower/`."""
    if source.built_from_code:
        return
    target = Path(directory) / BACKBONE_DIR
    _copy_architecture_files(source.vlm, target)
    tokenizer.save_pretrained(target)
    if source.vision_tower is not None:
        _copy_architecture_files(source.vision_tower, target / VISION_TOWER_DIR)


def _copy_architecture_files(name: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for filename in ARCHITECTURE_FILES:
        path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False)
        if path is None:
            if filename == "config.json":
                raise FileNotFoundError(f"{name!r} has no config.json to save with the checkpoint.")
            continue
        destination = target / filename
        if not (destination.exists() and os.path.samefile(path, destination)):  # re-saving in place
            shutil.copyfile(path, destination)


def checkpoint_backbone_source(
    checkpoint: str | Path, config: Llava3DFusionConfig, **hub_arguments
) -> BackboneSource:
    """The backbone files of a saved policy (a local directory or a Hub repo id).

    A checkpoint without a `backbone/` folder (the tiny backbone, or one saved before checkpoints
    carried their backbone files) falls back to `vlm_model_name` / `vision_tower_name` of its config.
    """
    fallback = BackboneSource.from_config(config)
    if fallback.built_from_code:
        return fallback
    if os.path.isdir(checkpoint):
        root = Path(checkpoint)
    else:
        options = {key: value for key, value in hub_arguments.items() if key in HUB_ARGUMENTS}
        root = Path(
            snapshot_download(repo_id=str(checkpoint), allow_patterns=[f"{BACKBONE_DIR}/**"], **options)
        )
    backbone = root / BACKBONE_DIR
    if not (backbone / "config.json").is_file():
        logger.warning(
            "%s carries no %s/ folder: reading the backbone's architecture from vlm_model_name=%r "
            "(re-save the policy to make the checkpoint self-contained).",
            checkpoint,
            BACKBONE_DIR,
            config.vlm_model_name,
        )
        return fallback
    vision_tower = backbone / VISION_TOWER_DIR
    return BackboneSource(str(backbone), str(vision_tower) if vision_tower.is_dir() else None)
