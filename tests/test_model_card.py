"""The card a `--policy.push_to_hub=true` run publishes (`model_card.py`); the push itself through
`lerobot-train` is tested in test_lerobot_scripts.py (`test_lerobot_train_push_to_hub_flag`)."""

import pytest
from helpers import tiny_config
from huggingface_hub import ModelCard, RepoCard
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.configs.default import DatasetConfig
from lerobot.configs.train import TrainPipelineConfig

from lerobot_llava3d_fusion.model_card import INSTALL_COMMAND, build_model_card, hub_id


@pytest.fixture(autouse=True)
def offline_card_validation(monkeypatch):
    """`ModelCard.validate` posts the card to the Hub's validator: recorded here instead."""
    validated = []
    monkeypatch.setattr(RepoCard, "validate", lambda card, repo_type=None: validated.append(str(card)))
    return validated


def rgbd_features() -> dict[str, PolicyFeature]:
    """A robot's RealSense (depth under the robot's key, intrinsics in the config) and a wrist camera
    whose metric depth and intrinsics arrive with each observation."""
    return {
        "observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, 48, 64)),
        "observation.images.front_depth": PolicyFeature(FeatureType.VISUAL, (1, 48, 64)),
        "observation.images.wrist": PolicyFeature(FeatureType.VISUAL, (3, 40, 40)),
        "observation.depth.wrist": PolicyFeature(FeatureType.VISUAL, (1, 40, 40)),
        "observation.intrinsics.wrist": PolicyFeature(FeatureType.STATE, (3, 3)),
        "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
    }


FRONT_K = [[50.0, 0.0, 32.0], [0.0, 50.0, 24.0], [0.0, 0.0, 1.0]]


def card_for(**overrides) -> ModelCard:
    return build_model_card(tiny_config(repo_id="user/policy", **overrides), "user/data", tags=["mine"])


def table_row(card: ModelCard, start: str) -> str:
    (row,) = [line for line in card.text.splitlines() if line.startswith(f"| {start}")]
    return row


def test_card_of_the_tiny_backbone_installs_and_claims_no_base_or_licence(offline_card_validation):
    card = card_for()
    assert card.data.license == "unknown"  # not LeRobot's apache-2.0 default
    assert card.data.base_model is None
    assert {"mine", "lerobot", "robotics", "llava3d_fusion"} <= set(card.data.tags)
    assert card.data.library_name == "lerobot" and card.data.pipeline_tag == "robotics"
    # The install line comes before any command that needs the plugin.
    assert card.text.index(INSTALL_COMMAND) < card.text.index("lerobot-rollout")
    assert "geometry=none" in card.text and "depth of" not in card.text
    assert "`observation.state` | 5 values" in card.text
    assert "`action` | 3 values" in card.text
    assert offline_card_validation == [str(card)]  # validated like LeRobot's own card


def test_card_names_the_backbone_as_base_model_with_its_licence():
    card = card_for(vlm_model_name="llava-hf/llava-1.5-7b-hf")
    assert card.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert card.data.license == "llama2"
    card = card_for(vlm_model_name="llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    assert card.data.license == "apache-2.0"
    # A backbone the plugin does not know: its id, but no licence guessed.
    card = card_for(vlm_model_name="someone/llava-finetune")
    assert card.data.base_model == "someone/llava-finetune" and card.data.license == "unknown"
    assert "not known to the plugin" in card.text
    # The user's --policy.license wins.
    assert card_for(vlm_model_name="llava-hf/llava-1.5-7b-hf", license="mit").data.license == "mit"


def test_card_lists_the_depth_keys_units_and_where_the_intrinsics_come_from():
    card = card_for(geometry="depth", input_features=rgbd_features(), camera_intrinsics={"front": FRONT_K})
    front_depth = table_row(card, "depth of `front`")
    assert "`observation.images.front_depth`" in front_depth and "uint16 millimetres" in front_depth
    assert str(FRONT_K) in table_row(card, "intrinsics of `front`")  # from the checkpoint's config
    wrist_depth = table_row(card, "depth of `wrist`")
    assert "`observation.depth.wrist`" in wrist_depth and "float32 metres" in wrist_depth
    assert "every observation" in table_row(card, "intrinsics of `wrist`")
    # The rollout command asks the robot's camera for depth, as the policy was trained on it.
    assert "front: {type: intelrealsense, serial_number_or_name: <serial>, use_depth: true" in card.text
    assert "wrist: {type: opencv" in card.text


def test_card_says_when_no_intrinsics_were_saved():
    features = {k: v for k, v in rgbd_features().items() if k != "observation.intrinsics.wrist"}
    card = card_for(geometry="depth", input_features=features, camera_intrinsics={"front": FRONT_K})
    assert "**not saved**" in table_row(card, "intrinsics of `wrist`")
    assert "--policy.camera_intrinsics" in table_row(card, "intrinsics of `wrist`")


def test_lora_card_names_the_base_checkpoint_it_needs(tmp_path):
    card = card_for(use_peft=True, pretrained_path="user/base_policy")
    assert card.data.base_model == "user/base_policy"
    assert card.data.to_dict()["base_model_relation"] == "adapter"
    assert "LoRA adapter" in card.text and "**`user/base_policy`**" in card.text
    # Its training command: the adapter run on top of that base.
    config = tiny_config(repo_id="user/lora", use_peft=True, pretrained_path="user/base_policy")
    train_config = TrainPipelineConfig(dataset=DatasetConfig(repo_id="user/data"), policy=config, steps=7)
    card = build_model_card(config, "user/data", tags=None, cfg=train_config)
    assert "--policy.path=user/base_policy \\\n  --peft.method_type=LORA \\\n  --steps=7" in card.text
    # A base in a local directory: no Hub id to link, and the card says what to do about it.
    card = card_for(use_peft=True, pretrained_path=str(tmp_path))
    assert card.data.base_model is None
    assert str(tmp_path) in card.text and "local directory" in card.text


def test_hub_ids_are_told_apart_from_local_paths(tmp_path):
    assert hub_id("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert hub_id("tiny") is None and hub_id(None) is None
    assert hub_id(tmp_path) is None and hub_id("./not a repo/x") is None


def test_the_policy_publishes_this_card(policy):
    card = policy.generate_model_card("user/data", policy.config.type, None, None)
    assert INSTALL_COMMAND in card.text and card.data.license == "unknown"
