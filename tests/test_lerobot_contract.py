"""LeRobot's generic policy checks, run on llava3d_fusion through LeRobot's own factory functions.

LeRobot checks every policy it ships the same way (its tests/policies/test_policies.py): the factory
resolves the type to a policy class whose `__init__` annotates `config` with a class the config is an
instance of; the policy builds from dataset features; `forward` and `select_action` leave their inputs
alone; `save_pretrained` -> `from_pretrained` restores every parameter; the processor pipelines save and
load. These checks are written here for this policy, on the tiny random backbone.
"""

import copy
import inspect

import pytest
import torch
from helpers import ACTION_DIM, CAMERAS, CHUNK, STATE_DIM, raw_batch, tiny_config
from lerobot.configs import PreTrainedConfig
from lerobot.configs.default import DatasetConfig
from lerobot.configs.train import TrainPipelineConfig
from lerobot.datasets import LeRobotDatasetMetadata
from lerobot.optim.factory import make_optimizer_and_scheduler
from lerobot.policies import make_policy
from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_STATE

from lerobot_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

POLICY_TYPE = "llava3d_fusion"
IMAGE_SIZE = 40


def test_factory_resolves_the_type_to_this_policy_and_its_config():
    policy_cls = get_policy_class(POLICY_TYPE)
    config = make_policy_config(POLICY_TYPE)
    assert policy_cls is Llava3DFusionPolicy
    assert policy_cls.name == POLICY_TYPE and config.type == POLICY_TYPE
    assert policy_cls.config_class is Llava3DFusionConfig
    assert PreTrainedConfig.get_choice_class(POLICY_TYPE) is Llava3DFusionConfig
    # LeRobot's check: the annotation is a class at runtime (a string annotation raises TypeError here).
    annotation = inspect.signature(policy_cls.__init__).parameters["config"].annotation
    assert issubclass(type(config), annotation)


@pytest.fixture
def dataset_meta(tmp_path) -> LeRobotDatasetMetadata:
    """Metadata of a dataset with the tests' two cameras, a state and an action (no episodes)."""
    names = [f"joint_{i}" for i in range(ACTION_DIM)]
    features = {
        **{
            key: {
                "dtype": "image",
                "shape": (IMAGE_SIZE, IMAGE_SIZE, 3),
                "names": ["height", "width", "channels"],
            }
            for key in CAMERAS
        },
        OBS_STATE: {"dtype": "float32", "shape": (STATE_DIM,), "names": [f"s{i}" for i in range(STATE_DIM)]},
        ACTION: {"dtype": "float32", "shape": (ACTION_DIM,), "names": names},
    }
    return LeRobotDatasetMetadata.create("user/contract", fps=10, features=features, root=tmp_path / "ds")


def tiny_policy_config(**overrides) -> Llava3DFusionConfig:
    """`make_policy_config` with the tests' tiny backbone and sizes; features come from the dataset."""
    fields = dict(
        vlm_model_name="tiny", chunk_size=CHUNK, n_action_steps=CHUNK, max_state_dim=8, max_action_dim=4,
        num_steps=2, device="cpu", push_to_hub=False,
    )  # fmt: skip
    return make_policy_config(POLICY_TYPE, **{**fields, **overrides})


def test_make_policy_builds_it_from_dataset_features(dataset_meta):
    config = tiny_policy_config()
    policy = make_policy(config, ds_meta=dataset_meta)
    assert isinstance(policy, Llava3DFusionPolicy) and isinstance(policy, PreTrainedPolicy)
    assert set(policy.config.input_features) == {*CAMERAS, OBS_STATE}
    assert policy.config.output_features[ACTION].shape == (ACTION_DIM,)
    assert policy.config.action_feature_names == [f"joint_{i}" for i in range(ACTION_DIM)]


def test_forward_and_select_action_leave_their_inputs_unchanged(dataset_meta):
    torch.manual_seed(0)
    config = tiny_policy_config()
    policy = make_policy(config, ds_meta=dataset_meta)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=None)
    batch = preprocessor(raw_batch())
    before = copy.deepcopy(batch)

    policy.train()
    loss, info = policy.forward(batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert isinstance(info, dict) and all(isinstance(value, float) for value in info.values())
    assert_same_batch(batch, before)

    observation = {key: value for key, value in batch.items() if key != ACTION}
    observation_before = copy.deepcopy(observation)
    policy.reset()
    with torch.inference_mode():
        action = policy.select_action(observation)
        chunk = policy.predict_action_chunk(observation)
    assert action.shape == (2, ACTION_DIM) and chunk.shape == (2, CHUNK, ACTION_DIM)
    assert postprocessor(action).shape == (2, ACTION_DIM)
    assert_same_batch(observation, observation_before)
    assert len(policy._action_queue) == CHUNK - 1
    policy.reset()
    assert len(policy._action_queue) == 0


def assert_same_batch(batch: dict, before: dict) -> None:
    assert set(batch) == set(before)
    for key, value in batch.items():
        same = torch.equal(value, before[key]) if isinstance(value, torch.Tensor) else value == before[key]
        assert same, f"{key} was changed in place"


def test_optimizer_and_scheduler_come_from_the_policy_presets(dataset_meta):
    config = tiny_policy_config(train_expert_only=True)
    policy = make_policy(config, ds_meta=dataset_meta)
    train_config = TrainPipelineConfig(
        dataset=DatasetConfig(repo_id="user/contract"), policy=config, steps=10
    )
    train_config.optimizer = config.get_optimizer_preset()
    train_config.scheduler = config.get_scheduler_preset()
    optimizer, scheduler = make_optimizer_and_scheduler(train_config, policy)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in policy.parameters() if p.requires_grad}
    frozen = {id(p) for p in policy.parameters() if not p.requires_grad}
    assert optimized == trainable and frozen  # the frozen VLM stream is left out
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == config.optimizer_lr
    assert group["weight_decay"] == config.optimizer_weight_decay
    assert scheduler is not None and scheduler.get_last_lr() == [group["lr"]]


def test_save_and_from_pretrained_restore_every_parameter_and_leave_the_config_alone(tmp_path, dataset_meta):
    torch.manual_seed(0)
    policy = Llava3DFusionPolicy(tiny_config())
    checkpoint = tmp_path / "checkpoint"
    policy.save_pretrained(checkpoint)
    expected = policy.state_dict()

    caller_config = tiny_config()
    caller_fields = copy.deepcopy(vars(caller_config))
    torch.manual_seed(1)  # anything the checkpoint did not restore would differ
    loaded = Llava3DFusionPolicy.from_pretrained(checkpoint, config=caller_config)
    torch.testing.assert_close(dict(loaded.state_dict()), dict(expected), rtol=0, atol=0)
    assert vars(caller_config) == caller_fields, "from_pretrained changed the caller's config"

    # As lerobot-eval and fine-tuning load it: the config from the checkpoint, then LeRobot's factory.
    config = PreTrainedConfig.from_pretrained(checkpoint)
    config.pretrained_path = checkpoint
    torch.manual_seed(2)
    from_factory = make_policy(config, ds_meta=dataset_meta)
    torch.testing.assert_close(dict(from_factory.state_dict()), dict(expected), rtol=0, atol=0)


def test_processor_pipelines_save_and_load_through_the_factory(tmp_path):
    config = tiny_config()
    stats = {
        OBS_STATE: {"mean": torch.full((STATE_DIM,), 0.5), "std": torch.full((STATE_DIM,), 2.0)},
        ACTION: {"mean": torch.full((ACTION_DIM,), -0.25), "std": torch.full((ACTION_DIM,), 0.5)},
    }
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=stats)
    preprocessor.save_pretrained(tmp_path)
    postprocessor.save_pretrained(tmp_path)
    loaded_pre, loaded_post = make_pre_post_processors(config, pretrained_path=str(tmp_path))

    assert [type(step) for step in loaded_pre.steps] == [type(step) for step in preprocessor.steps]
    expected, got = preprocessor(raw_batch()), loaded_pre(raw_batch())
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
    # The statistics were restored: the state is normalised with them, the actions come back with them.
    assert torch.allclose(got[OBS_STATE], (raw_batch()[OBS_STATE] - 0.5) / 2.0, atol=1e-6)
    action = torch.randn(2, ACTION_DIM)
    assert torch.allclose(loaded_post(action), action * 0.5 - 0.25, atol=1e-6)
