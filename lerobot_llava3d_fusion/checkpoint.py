"""Loading a policy checkpoint's weights: strictly, across known layout changes, checked.

LeRobot's `PreTrainedPolicy.from_pretrained` loads `model.safetensors` with `strict=False` and only
logs the keys that do not match, so a checkpoint saved under another module layout (a transformers
upgrade, an edited config.json) would act with random weights. Here loading:

* maps the known module-layout changes (`KEY_MIGRATIONS`), each only where it turns a key the policy
  does not have into one it has;
* fails on any key still missing or unexpected, naming the modules concerned (tensors that share
  storage with a loaded one, which safetensors saves once, are not missing);
* refuses a file it cannot read, or whose tensors hold NaN or inf, naming the file;
* compares the library versions the checkpoint recorded (`VERSIONS_FILE`, written at save) with
  this environment's, and warns about each difference.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from packaging.version import InvalidVersion, Version
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.utils import cached_file

from lerobot_llava3d_fusion.backbones.files import HUB_ARGUMENTS

logger = logging.getLogger(__name__)

# Written next to config.json: the versions of the libraries the checkpoint was saved with.
VERSIONS_FILE = "library_versions.json"
RECORDED_DISTRIBUTIONS = ("lerobot", "transformers", "torch", "lerobot_policy_llava3d_fusion")
# How many keys an error lists of each kind.
LISTED_KEYS = 10


class CheckpointError(ValueError):
    """A checkpoint whose weights cannot be loaded as they are (damaged, or not matching the policy)."""


@dataclass(frozen=True)
class KeyMigration:
    """A module-layout change: keys under `old_prefix` are now under `new_prefix`.

    `both_ways`: both layouts are current under some library version the package allows, so a
    checkpoint saved under either must load under the other.
    """

    description: str
    old_prefix: str
    new_prefix: str
    both_ways: bool = False

    def renamings(self, key: str) -> Iterable[str]:
        """The names `key` may have in the other layout(s)."""
        if key.startswith(self.old_prefix):
            yield self.new_prefix + key[len(self.old_prefix) :]
        if self.both_ways and key.startswith(self.new_prefix):
            yield self.old_prefix + key[len(self.new_prefix) :]


VISION_TOWER_PREFIX = "model.image_encoder.vision_tower."
KEY_MIGRATIONS = (
    # transformers 5.5: SiglipVisionModel.vision_model (a SiglipVisionTransformer) holds embeddings,
    # encoder, post_layernorm and head; by 5.24 SiglipVisionModel holds them itself (CLIPVisionModel
    # alike). Both ends are in the allowed range: the `libero` extra resolves 5.5, a plain install 5.24+.
    KeyMigration(
        "SigLIP/CLIP vision tower with or without its `vision_model` level (transformers 5.5 / 5.24+)",
        old_prefix=VISION_TOWER_PREFIX + "vision_model.",
        new_prefix=VISION_TOWER_PREFIX,
        both_ways=True,
    ),
    # This package's rename of the 3D point encoder and its MLP.
    KeyMigration(
        "3D encoder renamed from patch_geometry.encoder to geometry_encoder.position_mlp",
        old_prefix="model.patch_geometry.encoder.",
        new_prefix="model.geometry_encoder.position_mlp.",
    ),
)


def migrate_keys(state_dict: dict[str, object], expected: set[str]) -> tuple[dict[str, object], list[str]]:
    """Rename the keys of `state_dict` that `expected` (the policy's keys) lacks but knows under a
    migrated name; -> the renamed state dict and the descriptions of the migrations applied."""
    migrated, applied = {}, set()
    for key, tensor in state_dict.items():
        if key not in expected:
            for migration in KEY_MIGRATIONS:
                target = next(
                    (
                        name
                        for name in migration.renamings(key)
                        if name in expected and name not in state_dict
                    ),
                    None,
                )
                if target is not None:
                    key = target
                    applied.add(migration.description)
                    break
        migrated[key] = tensor
    return migrated, sorted(applied)


def load_weights(model: nn.Module, model_file: str | Path, device: str | torch.device, strict: bool) -> None:
    """Load `model_file` (safetensors) into `model`, migrating known layout changes.

    Raises `CheckpointError` naming the file when it cannot be read or holds non-finite tensors, and,
    with `strict`, when keys are still missing or unexpected after the migrations (without `strict`
    they are logged, and the modules concerned keep the weights they were built with).
    """
    model_file = Path(model_file)
    recorded = read_recorded_versions(model_file.parent)
    warn_about_version_differences(model_file, recorded)
    state_dict = _read_tensors(model_file, device)
    _check_finite(model_file, state_dict)
    expected = set(model.state_dict())
    state_dict, applied = migrate_keys(state_dict, expected)
    for description in applied:
        logger.info(
            "%s: mapped the checkpoint's keys for a known layout change: %s.", model_file, description
        )
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shapes that differ: the config's sizes are not the checkpoint's
        raise CheckpointError(
            f"{model_file}: its tensors do not fit the policy built from its config.json ({error}). Was "
            "config.json edited (a size such as max_state_dim or chunk_size)? Restore it."
        ) from error
    missing = sorted(set(result.missing_keys) - _aliases_of_loaded(model, state_dict.keys()))
    unexpected = sorted(result.unexpected_keys)
    if not (missing or unexpected):
        return
    message = _mismatch_message(model_file, missing, unexpected, expected, set(state_dict), recorded)
    if strict:
        raise CheckpointError(message)
    logger.warning("%s Loaded anyway (strict=False).", message)


def read_saved_tensors(model: nn.Module, model_file: str | Path, names: Iterable[str]) -> dict[str, Tensor]:
    """The tensors `model_file` saved for the keys `names` of `model` (through the known layout
    migrations), read one by one on the CPU; keys the file does not hold are left out."""
    model_file = Path(model_file)
    try:
        with safe_open(model_file, framework="pt", device="cpu") as saved:
            file_keys = {key: key for key in saved.keys()}  # noqa: SIM118 (safe_open is not iterable)
            file_key_of, _ = migrate_keys(file_keys, set(model.state_dict()))
            return {name: saved.get_tensor(file_key_of[name]) for name in names if name in file_key_of}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"cannot read {model_file} again for the float32 weights it saved: {error}. Was it moved "
            "or replaced after the policy was loaded?"
        ) from error


def _read_tensors(model_file: Path, device: str | torch.device) -> dict[str, Tensor]:
    try:
        return load_file(model_file, device=str(device))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"cannot read {model_file}: {error}. The file is damaged or incomplete (an interrupted "
            "download or copy?): download or copy the checkpoint again."
        ) from error


def _check_finite(model_file: Path, state_dict: dict[str, Tensor]) -> None:
    damaged = [
        name
        for name, tensor in state_dict.items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if damaged:
        raise CheckpointError(
            f"{model_file}: {len(damaged)} tensor(s) hold NaN or inf values: {_listed(damaged)}. The file "
            "is damaged (a corrupted download or copy?) or was saved from a diverged training run: "
            "download or copy it again, or use an earlier checkpoint."
        )


def _aliases_of_loaded(model: nn.Module, loaded: Iterable[str]) -> set[str]:
    """Keys of `model` whose tensor shares its storage with a loaded key's: safetensors saves shared
    tensors once, so the other names are loaded through it."""
    names_by_storage = defaultdict(set)
    for name, tensor in model.state_dict().items():
        names_by_storage[(tensor.untyped_storage().data_ptr(), tensor.shape)].add(name)
    loaded = set(loaded)
    return {name for names in names_by_storage.values() if names & loaded for name in names - loaded}


def _mismatch_message(
    model_file: Path,
    missing: list[str],
    unexpected: list[str],
    expected: set[str],
    loaded: set[str],
    recorded: dict[str, str] | None,
) -> str:
    parts = [f"{model_file} does not match the policy its config.json builds."]
    if missing:
        parts.append(
            f"No weights for {len(missing)} key(s) of the modules {_top_modules(missing, loaded)} "
            f"({_listed(missing)}): the config builds modules the checkpoint was not trained with."
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} weight(s) of the modules {_top_modules(unexpected, expected)} are not used "
            f"({_listed(unexpected)}): the config drops modules the checkpoint trained."
        )
    parts.append(
        "Was config.json edited (e.g. geometry, geometry_encoder, use_state_token, expert_mode)? Restore "
        "the checkpoint's own values."
    )
    differences = _version_differences(recorded)
    if differences:
        parts.append(
            f"It was saved with {differences}: a module layout changed between those versions that this "
            f"package does not map; install the versions the checkpoint names in {VERSIONS_FILE}."
        )
    return " ".join(parts)


def _top_modules(keys: Iterable[str], others: set[str]) -> list[str]:
    """For each key, its shortest prefix (module path) that no key of `others` shares."""
    other_prefixes = {
        ".".join(key.split(".")[:depth]) for key in others for depth in range(1, key.count(".") + 1)
    }
    modules = set()
    for key in keys:
        parts = key.split(".")
        prefix = next(
            (
                ".".join(parts[:depth])
                for depth in range(1, len(parts))
                if ".".join(parts[:depth]) not in other_prefixes
            ),
            key,
        )
        modules.add(prefix)
    return sorted(modules)


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else ""
    return f"{keys[:LISTED_KEYS]}{more}"


# ------------------------------------------------------------------------------ library versions


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose changes can change what a checkpoint means."""
    versions = {}
    for distribution in RECORDED_DISTRIBUTIONS:
        try:
            versions[distribution] = version(distribution)
        except PackageNotFoundError:
            versions[distribution] = "unknown"
    return versions


def save_library_versions(directory: str | Path) -> None:
    (Path(directory) / VERSIONS_FILE).write_text(json.dumps(library_versions(), indent=2) + "\n")


def fetch_versions_file(checkpoint: str | Path, **hub_arguments) -> None:
    """Download a Hub checkpoint's VERSIONS_FILE next to its weights (a local directory has it already)."""
    if not Path(checkpoint).is_dir():
        options = {key: value for key, value in hub_arguments.items() if key in HUB_ARGUMENTS}
        cached_file(str(checkpoint), VERSIONS_FILE, _raise_exceptions_for_missing_entries=False, **options)


def read_recorded_versions(directory: str | Path) -> dict[str, str] | None:
    """The versions recorded in `directory`'s VERSIONS_FILE; None for a checkpoint saved without it."""
    path = Path(directory) / VERSIONS_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): restore it or delete it.") from error
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{path}: expected a JSON object of library versions, got {recorded!r}.")
    return {str(name): str(value) for name, value in recorded.items()}


def warn_about_version_differences(model_file: Path, recorded: dict[str, str] | None) -> None:
    if recorded is None:
        logger.info("%s: no %s beside it, so its library versions are unknown.", model_file, VERSIONS_FILE)
        return
    differences = _version_differences(recorded)
    if differences:
        logger.warning(
            "%s was saved with %s. Known module-layout changes are mapped on load; numbers may still "
            "differ slightly. To reproduce its results exactly, install the versions it names in %s.",
            model_file,
            differences,
            VERSIONS_FILE,
        )


def _version_differences(recorded: dict[str, str] | None) -> str:
    """'transformers 5.24.0 (installed: 5.5.4), ...' for the recorded libraries whose installed version
    differs (local build tags such as torch's +cu130 aside); '' when none."""
    if recorded is None:
        return ""
    installed = library_versions()
    differences = [
        f"{name} {recorded[name]} (installed: {installed[name]})"
        for name in RECORDED_DISTRIBUTIONS
        if name in recorded and _public(recorded[name]) != _public(installed[name])
    ]
    return ", ".join(differences)


def _public(text: str) -> str:
    try:
        return Version(text).public
    except InvalidVersion:
        return text
