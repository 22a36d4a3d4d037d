"""Loading checkpoints: strict, across known layout changes, with their library versions, and refusing
damaged files by name (`lerobot_llava3d_fusion/checkpoint.py`)."""

import json
import logging
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from golden_case import golden_inputs, golden_policy  # noqa: E402

from lerobot_llava3d_fusion.checkpoint import (  # noqa: E402
    VERSIONS_FILE,
    CheckpointError,
    library_versions,
    load_weights,
)
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy  # noqa: E402

WEIGHTS = "model.safetensors"
TOWER = "model.image_encoder.vision_tower."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny geometry=depth policy (state token on), its inputs and its actions."""
    policy = golden_policy()
    directory = tmp_path_factory.mktemp("checkpoint")
    policy.save_pretrained(directory)
    batch, noise, _ = golden_inputs(policy)
    return directory, batch, noise, policy.eval().predict_action_chunk(batch, noise=noise)


@pytest.fixture
def checkpoint(saved, tmp_path):
    """A fresh copy of the saved checkpoint, free to edit."""
    directory = saved[0]
    for path in directory.rglob("*"):
        if path.is_file():
            target = tmp_path / path.relative_to(directory)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return tmp_path


def edit_config(directory: Path, **fields) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


def rename_keys(directory: Path, rename) -> None:
    """Rewrite the checkpoint's weights with each key renamed by `rename` (as another layout saves them)."""
    tensors = load_file(directory / WEIGHTS)
    save_file({rename(key): tensor for key, tensor in tensors.items()}, directory / WEIGHTS)


def other_vision_tower_layout(key: str) -> str:
    """The key of a SigLIP tower weight under the other transformers layout: 5.5's
    `vision_tower.vision_model.X` <-> 5.24's `vision_tower.X`."""
    if not key.startswith(TOWER):
        return key
    rest = key[len(TOWER) :]
    return TOWER + (
        rest.removeprefix("vision_model.") if rest.startswith("vision_model.") else "vision_model." + rest
    )


def assert_same_actions(saved, reloaded: Llava3DFusionPolicy) -> None:
    _, batch, noise, actions = saved
    torch.testing.assert_close(reloaded.predict_action_chunk(batch, noise=noise), actions, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ strictness


@pytest.mark.transformers_range
def test_a_checkpoint_reloads_strictly_to_the_same_actions(saved, checkpoint):
    assert_same_actions(saved, Llava3DFusionPolicy.from_pretrained(checkpoint))


@pytest.mark.parametrize(
    ("fields", "dropped"),
    [
        ({"geometry": "none"}, "model.geometry_encoder"),
        ({"use_state_token": False}, "model.action_expert.state_proj"),
    ],
)
def test_a_config_that_drops_trained_modules_fails_naming_them(checkpoint, fields, dropped):
    edit_config(checkpoint, **fields)
    with pytest.raises(CheckpointError, match=rf"modules \['{dropped}'\] are not used") as error:
        Llava3DFusionPolicy.from_pretrained(checkpoint)
    assert str(checkpoint / WEIGHTS) in str(error.value) and "config.json edited" in str(error.value)


def test_weights_missing_for_a_module_of_the_config_fail_naming_it(checkpoint):
    rename_keys(
        checkpoint, lambda key: key.replace("model.action_expert.state_proj.", "model.old_state_proj.")
    )
    with pytest.raises(CheckpointError) as error:
        Llava3DFusionPolicy.from_pretrained(checkpoint)
    message = str(error.value)
    assert "No weights for 2 key(s) of the modules ['model.action_expert.state_proj']" in message
    assert "['model.old_state_proj'] are not used" in message


def test_strict_false_loads_what_matches_and_warns(checkpoint, caplog):
    edit_config(checkpoint, use_state_token=False)
    with caplog.at_level(logging.WARNING):
        policy = Llava3DFusionPolicy.from_pretrained(checkpoint, strict=False)
    assert policy.model.action_expert.state_proj is None
    assert "model.action_expert.state_proj" in caplog.text and "strict=False" in caplog.text


def test_tensors_of_another_shape_fail_naming_the_file(checkpoint):
    edit_config(checkpoint, max_state_dim=10)
    with pytest.raises(CheckpointError, match=r"do not fit the policy built from its config.json") as error:
        Llava3DFusionPolicy.from_pretrained(checkpoint)
    assert str(checkpoint / WEIGHTS) in str(error.value)


def test_tied_tensors_saved_once_load_strictly(tmp_path):
    """safetensors saves tensors that share storage once; the other names are not missing."""

    def tied() -> nn.Module:
        module = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
        module[1].weight = module[0].weight
        return module

    source, target = tied(), tied()
    save_model(source, tmp_path / WEIGHTS)
    assert len(load_file(tmp_path / WEIGHTS)) == 1
    load_weights(target, tmp_path / WEIGHTS, "cpu", strict=True)
    assert torch.equal(target[1].weight, source[0].weight)


def test_from_pretrained_leaves_the_callers_config_alone(checkpoint):
    config = Llava3DFusionPolicy.config_class.from_pretrained(checkpoint)
    config.load_vlm_weights = True
    policy = Llava3DFusionPolicy.from_pretrained(checkpoint, config=config)
    assert config.load_vlm_weights is True
    assert policy.config is not config and policy.config.load_vlm_weights is False


# ------------------------------------------------------------------------------------ migrations


@pytest.mark.transformers_range
def test_the_installed_vision_tower_has_one_of_the_two_mapped_layouts(saved):
    tower_keys = [key for key in load_file(saved[0] / WEIGHTS) if key.startswith(TOWER)]
    assert len(tower_keys) == 48  # the tiny SigLIP: 2 layers x 16, embeddings 3, post-norm 2, head 11
    with_level = {key.startswith(TOWER + "vision_model.") for key in tower_keys}
    assert len(with_level) == 1  # all or none: transformers 5.5 nests them, 5.24+ does not
    assert (
        f"{TOWER}{'vision_model.' if with_level.pop() else ''}embeddings.patch_embedding.weight" in tower_keys
    )


@pytest.mark.transformers_range
def test_a_checkpoint_of_the_other_vision_tower_layout_loads_to_the_same_actions(saved, checkpoint, caplog):
    rename_keys(checkpoint, other_vision_tower_layout)
    with caplog.at_level(logging.INFO, logger="lerobot_llava3d_fusion.checkpoint"):
        reloaded = Llava3DFusionPolicy.from_pretrained(checkpoint)
    assert "vision_model" in caplog.text  # the migration applied is reported
    assert_same_actions(saved, reloaded)


def test_a_checkpoint_from_before_the_geometry_encoder_rename_loads_to_the_same_actions(saved, checkpoint):
    new, old = "model.geometry_encoder.position_mlp.", "model.patch_geometry.encoder."
    rename_keys(checkpoint, lambda key: key.replace(new, old))
    assert any(key.startswith(old) for key in load_file(checkpoint / WEIGHTS))
    assert_same_actions(saved, Llava3DFusionPolicy.from_pretrained(checkpoint))


# -------------------------------------------------------------------------------------- versions


@pytest.mark.transformers_range
def test_a_checkpoint_records_the_library_versions_it_was_saved_with(saved):
    recorded = json.loads((saved[0] / VERSIONS_FILE).read_text())
    assert recorded == library_versions()
    assert set(recorded) == {"lerobot", "transformers", "torch", "lerobot_policy_llava3d_fusion"}
    assert recorded["transformers"] != "unknown"


def test_a_version_difference_is_reported_naming_both_versions(checkpoint, caplog):
    installed = library_versions()["transformers"]
    recorded = json.loads((checkpoint / VERSIONS_FILE).read_text())
    (checkpoint / VERSIONS_FILE).write_text(json.dumps({**recorded, "transformers": "5.99.0"}))
    with caplog.at_level(logging.WARNING):
        Llava3DFusionPolicy.from_pretrained(checkpoint)
    assert f"transformers 5.99.0 (installed: {installed})" in caplog.text


def test_a_build_tag_alone_is_no_version_difference(checkpoint, caplog):
    recorded = json.loads((checkpoint / VERSIONS_FILE).read_text())
    torch_public = recorded["torch"].split("+")[0]
    (checkpoint / VERSIONS_FILE).write_text(json.dumps({**recorded, "torch": f"{torch_public}+otherbuild"}))
    with caplog.at_level(logging.WARNING):
        Llava3DFusionPolicy.from_pretrained(checkpoint)
    assert "installed:" not in caplog.text


def test_an_unmapped_layout_change_names_the_versions_to_install(checkpoint):
    recorded = json.loads((checkpoint / VERSIONS_FILE).read_text())
    (checkpoint / VERSIONS_FILE).write_text(json.dumps({**recorded, "transformers": "5.99.0"}))
    rename_keys(checkpoint, lambda key: key.replace(".mlp.fc1.", ".mlp.dense_in."))
    with pytest.raises(CheckpointError, match=r"saved with transformers 5\.99\.0 .*install the versions"):
        Llava3DFusionPolicy.from_pretrained(checkpoint)


# -------------------------------------------------------------------------------- damaged files


def data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts (after the 8-byte length and the JSON header)."""
    with open(path, "rb") as file:
        return 8 + struct.unpack("<Q", file.read(8))[0]


def test_a_file_with_a_few_kib_overwritten_is_refused_naming_the_tensors(checkpoint):
    path = checkpoint / WEIGHTS
    data = bytearray(path.read_bytes())
    start = data_offset(path) + 4096
    data[start : start + 4096] = b"\xff" * 4096  # 0xffffffff is a NaN in float32 and bfloat16
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"hold NaN or inf values: \['model\.") as error:
        Llava3DFusionPolicy.from_pretrained(checkpoint)
    assert str(path) in str(error.value) and "damaged" in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_an_unreadable_file_is_refused_naming_it(checkpoint, damage):
    path = checkpoint / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"#" * 64 + data[72:])
    with pytest.raises(CheckpointError, match=r"damaged or incomplete") as error:
        Llava3DFusionPolicy.from_pretrained(checkpoint)
    assert f"cannot read {path}" in str(error.value)


def test_non_finite_actions_are_refused_with_the_likely_cause(saved, checkpoint):
    policy = Llava3DFusionPolicy.from_pretrained(checkpoint)
    with torch.no_grad():
        policy.model.action_expert.action_out_proj.bias[0] = float("inf")
    _, batch, noise, _ = saved
    with pytest.raises(FloatingPointError, match=r"weights are damaged or come from a diverged training run"):
        policy.predict_action_chunk(batch, noise=noise)


@pytest.fixture
def bf16_checkpoint(tmp_path):
    """A trained bf16 policy's checkpoint (float32 master weights for what trains) and its saved tensors."""
    from helpers import tiny_policy

    policy = tiny_policy(dtype="bfloat16", freeze_vision_encoder=True).train()
    with torch.no_grad():  # values bf16 cannot hold, as a training run's updates leave them
        for param in policy.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 1e-4)
    policy.save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / WEIGHTS)


def _trainable(policy) -> dict[str, torch.Tensor]:
    return {name: param for name, param in policy.named_parameters() if param.requires_grad}


def test_a_bf16_checkpoint_is_loaded_in_bf16_before_it_reaches_the_device(bf16_checkpoint):
    """LeRobot's from_pretrained moves the policy to its device after loading: every weight is bf16 by
    then, so no float32 master copy occupies the accelerator (lerobot-eval, lerobot-rollout, the server)."""
    directory, _ = bf16_checkpoint
    loaded = Llava3DFusionPolicy.from_pretrained(directory)
    assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}


def test_training_a_loaded_bf16_checkpoint_restores_its_float32_weights_exactly(bf16_checkpoint):
    directory, saved_tensors = bf16_checkpoint
    loaded = Llava3DFusionPolicy.from_pretrained(directory)
    assert any(
        not torch.equal(param.float(), saved_tensors[name]) for name, param in _trainable(loaded).items()
    ), "the bf16 copies should round the trained values"
    loaded.train()
    trainable = _trainable(loaded)
    assert trainable
    for name, param in trainable.items():
        assert param.dtype == torch.float32, name
        assert torch.equal(param, saved_tensors[name]), name
    frozen = {param.dtype for param in loaded.parameters() if not param.requires_grad}
    assert frozen == {torch.bfloat16}


def test_a_loaded_bf16_checkpoint_saved_again_keeps_its_float32_weights(bf16_checkpoint, tmp_path):
    directory, saved_tensors = bf16_checkpoint
    loaded = Llava3DFusionPolicy.from_pretrained(directory)
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / WEIGHTS)
    for name in _trainable(loaded):
        assert again[name].dtype == torch.float32, name
        assert torch.equal(again[name], saved_tensors[name]), name


def test_a_weight_changed_after_loading_keeps_its_value_when_training_starts(bf16_checkpoint, caplog):
    directory, saved_tensors = bf16_checkpoint
    loaded = Llava3DFusionPolicy.from_pretrained(directory)
    name, param = next(iter(_trainable(loaded).items()))
    with torch.no_grad():
        param.fill_(0.5)
    with caplog.at_level(logging.WARNING):
        loaded.train()
    assert torch.equal(dict(loaded.named_parameters())[name], torch.full_like(saved_tensors[name], 0.5))
    assert "changed after loading" in caplog.text and name in caplog.text
    others = [other for other in _trainable(loaded) if other != name]
    assert all(torch.equal(dict(loaded.named_parameters())[o], saved_tensors[o]) for o in others)


def test_an_optimizer_built_on_a_loaded_bf16_checkpoint_gets_its_float32_weights(bf16_checkpoint):
    """lerobot-train (fine-tuning, --resume) builds the optimizer from get_optim_params() before it
    calls train(): the parameters it holds are the float32 masters, so a resumed optimizer state is
    cast to float32, not rounded to bf16."""
    directory, saved_tensors = bf16_checkpoint
    loaded = Llava3DFusionPolicy.from_pretrained(directory)
    params = loaded.get_optim_params()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    state = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.ones_like(p, dtype=torch.float64),
                           "exp_avg_sq": torch.ones_like(p, dtype=torch.float64)} for i, p in enumerate(params)},
             "param_groups": optimizer.state_dict()["param_groups"]}  # fmt: skip
    optimizer.load_state_dict(state)
    names = {id(param): name for name, param in loaded.named_parameters()}
    for param in params:
        assert param.dtype == torch.float32
        assert torch.equal(param, saved_tensors[names[id(param)]])
        assert optimizer.state[param]["exp_avg"].dtype == torch.float32
    loaded.train()
    assert all(param.dtype == torch.float32 for param in params)
