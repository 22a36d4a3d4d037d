"""The model card of a pushed checkpoint (`lerobot-train --policy.push_to_hub=true`).

LeRobot's generic card cannot serve this policy: its commands fail for a reader without this plugin,
it names no base model and says apache-2.0 whatever the backbone's licence. This card starts with the
install line, names the backbone (Hub metadata `base_model`) and its licence where known, lists the
inputs the checkpoint needs (cameras, depth keys and units, where the camera intrinsics come from,
state and action sizes) and the commands to run and to train it; a LoRA push names the base
checkpoint it needs. LeRobot's own card context (dataset, training settings) is reused as is.
"""

from importlib.resources import files
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from lerobot.configs.train import TrainPipelineConfig
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.policies.pretrained import _build_card_context
from lerobot.utils.constants import OBS_STATE

from lerobot_llava3d_fusion.configuration_llava3d_fusion import (
    EMPTY_CAMERA_PREFIX,
    TINY_VLM_NAME,
    Llava3DFusionConfig,
)
from lerobot_llava3d_fusion.observation_keys import (
    INTRINSICS_PREFIX,
    camera_name,
    depth_key,
    extrinsics_key,
    intrinsics_key,
    robot_depth_key,
)

INSTALL_COMMAND = "pip install lerobot_policy_llava3d_fusion"
TEMPLATE = "model_card_template.md"

# Licences of the backbones' weights (Hub licence ids, from their model cards). A checkpoint trained from
# one inherits its terms; any other backbone gets "unknown" rather than a guess.
BACKBONE_LICENSES = {
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "apache-2.0",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "apache-2.0",
    "llava-hf/llava-1.5-7b-hf": "llama2",
    "llava-hf/llava-1.5-13b-hf": "llama2",
}
UNKNOWN_LICENSE = "unknown"


def hub_id(name: str | Path | None) -> str | None:
    """`name` when it is a Hub repo id, None for a local path, the tiny test backbone or nothing."""
    if not name or str(name) == TINY_VLM_NAME or Path(name).exists():
        return None
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return None
    return str(name)


def backbone_hub_ids(config: Llava3DFusionConfig) -> list[str]:
    """Hub ids of the pretrained checkpoints the backbone was built from (VLM, then a vision tower)."""
    names = (config.vlm_model_name, config.vision_tower_name)
    return [repo for repo in map(hub_id, names) if repo is not None]


def card_license(config: Llava3DFusionConfig) -> str:
    """`--policy.license` when given, else the backbone's licence from `BACKBONE_LICENSES`, else unknown."""
    if config.license:
        return config.license
    return BACKBONE_LICENSES.get(config.vlm_model_name, UNKNOWN_LICENSE)


def input_rows(config: Llava3DFusionConfig) -> list[dict]:
    """The inputs table: per real camera its image, and for cameras with 3D points where their depth and
    camera matrices come from; then the state. Plain strings for the template."""
    features = config.input_features or {}
    geometry_cameras = set(config.geometry_camera_keys)
    rows = []
    for key in config.camera_keys:
        if key.startswith(EMPTY_CAMERA_PREFIX):
            continue
        name = camera_name(key)
        image = f"{tuple(features[key].shape)}, RGB in [0, 1]"
        rows.append(_row(f"camera `{name}`", key, image, "the camera"))
        if key in geometry_cameras:
            rows.append(_depth_row(config, key))
            for matrix_key, fallback, what in (
                (intrinsics_key(key), config.camera_intrinsics, "3 x 3 pinhole K of the depth's pixel grid"),
                (extrinsics_key(key), config.camera_extrinsics, "4 x 4 camera-to-world"),
            ):
                source = _matrix_source(features, matrix_key, fallback, name)
                if source or matrix_key.startswith(INTRINSICS_PREFIX):
                    rows.append(_row(f"{matrix_key.split('.')[1]} of `{name}`", matrix_key, what, source))
    state = config.robot_state_feature
    if state is not None:
        rows.append(_row("state", OBS_STATE, f"{state.shape[-1]} values", "the robot's proprioception"))
    return rows


def rollout_cameras(config: Llava3DFusionConfig) -> list[dict]:
    """`--robot.cameras` entries of a `lerobot-rollout` command: name, size, and whether the camera must
    deliver depth too (a RealSense with `use_depth: true`, when the policy was trained on a robot's depth)."""
    features = config.input_features or {}
    return [
        {
            "name": camera_name(key),
            "height": features[key].shape[-2],
            "width": features[key].shape[-1],
            "depth": robot_depth_key(key) in features,
        }
        for key in config.camera_keys
        if not key.startswith(EMPTY_CAMERA_PREFIX)
    ]


def _row(what: str, key: str | None, shape: str, source: str | None) -> dict:
    return {"what": what, "key": key, "shape": shape, "source": source}


def _depth_row(config: Llava3DFusionConfig, camera_key: str) -> dict:
    features = config.input_features or {}
    name = camera_name(camera_key)
    if config.geometry == "estimator":
        estimated = f"estimated from the image by `{config.depth_estimator_name}`"
        return _row(f"depth of `{name}`", None, "metres", estimated)
    robot_key, key = robot_depth_key(camera_key), depth_key(camera_key)
    if robot_key in features:
        return _row(
            f"depth of `{name}`", robot_key,
            f"{tuple(features[robot_key].shape)}, uint16 millimetres, 0 = none",
            "the robot's depth camera (`use_depth: true`); the preprocessor converts it to metres",
        )  # fmt: skip
    return _row(
        f"depth of `{name}`", key, f"{tuple(features[key].shape)}, float32 metres, 0 = none",
        f"a robot's uint16 millimetres also work: `--rename_map='{{\"{robot_key}\": \"{key}\"}}'`",
    )  # fmt: skip


def _matrix_source(features: dict, key: str, fallback: dict, name: str) -> str | None:
    if key in features:
        return "every observation"
    if name in fallback:
        return f"this checkpoint's config: `{fallback[name]}` (for the depth grid it was trained on)"
    return None


def training_command(config: Llava3DFusionConfig, cfg: TrainPipelineConfig | None) -> list[str]:
    """The main `lerobot-train` flags of the run that made this checkpoint (the rest: train_config.json)."""
    if cfg is None:
        return []
    flags = [f"--dataset.repo_id={cfg.dataset.repo_id}"]
    if config.pretrained_path:  # a fine-tune: the architecture came with that checkpoint
        flags.append(f"--policy.path={config.pretrained_path}")
    else:
        flags += [f"--policy.type={config.type}", f"--policy.vlm_model_name={config.vlm_model_name}"]
        if config.vision_tower_name:
            flags.append(f"--policy.vision_tower_name={config.vision_tower_name}")
        flags.append(f"--policy.geometry={config.geometry}")
        if config.depth_estimator_name:
            flags.append(f"--policy.depth_estimator_name={config.depth_estimator_name}")
    if config.use_peft:
        flags.append("--peft.method_type=LORA")
    return [*flags, f"--steps={cfg.steps}", f"--batch_size={cfg.batch_size}"]


def build_model_card(
    config: Llava3DFusionConfig,
    dataset_repo_id: str,
    tags: list[str] | None,
    cfg: TrainPipelineConfig | None = None,
    dataset_meta: LeRobotDatasetMetadata | None = None,
) -> ModelCard:
    """The card of a checkpoint of `config`, trained on `dataset_repo_id` (`cfg`: its TrainPipelineConfig)."""
    adapter_base = str(config.pretrained_path) if config.use_peft and config.pretrained_path else None
    base_models = [hub_id(adapter_base)] if adapter_base else backbone_hub_ids(config)
    base_models = [repo for repo in base_models if repo]  # a local directory has no Hub id
    card_data = ModelCardData(
        license=card_license(config),
        library_name="lerobot",
        pipeline_tag="robotics",
        tags=sorted(set(tags or []) | {"robotics", "lerobot", config.type, "vision-language-action"}),
        model_name=config.type,
        datasets=dataset_repo_id,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        base_model_relation="adapter" if adapter_base and base_models else None,
    )
    context = _build_card_context(cfg, dataset_meta, config.input_features, config.output_features)
    context.update(
        install_command=INSTALL_COMMAND,
        policy_repo_id=config.repo_id,
        backbone=config.vlm_model_name,
        vision_tower=config.vision_tower_name,
        backbone_license=BACKBONE_LICENSES.get(config.vlm_model_name),
        adapter_base=adapter_base,
        adapter_base_on_hub=hub_id(adapter_base) is not None,
        geometry=config.geometry,
        input_rows=input_rows(config),
        rollout_cameras=rollout_cameras(config),
        action_dim=config.action_feature.shape[-1],
        chunk_size=config.chunk_size,
        n_action_steps=config.n_action_steps,
        train_flags=training_command(config, cfg),
        env_type=getattr(getattr(cfg, "env", None), "type", None),
    )
    template = (files(__package__) / TEMPLATE).read_text(encoding="utf-8")
    card = ModelCard.from_template(card_data, template_str=template, **context)
    card.validate()
    return card
