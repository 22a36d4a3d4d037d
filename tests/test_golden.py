"""A saved tiny checkpoint must keep giving the same actions and losses: refactors cannot silently
change numbers. Regenerate with `tests/golden/make_golden.py` only for an intended change."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from golden_case import CHECKPOINT, OUTPUTS, golden_inputs  # noqa: E402

from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy  # noqa: E402


@pytest.mark.transformers_range  # a transformers 5.5 checkpoint: on 5.24+ its vision tower is migrated
def test_golden_checkpoint_gives_the_recorded_actions_and_losses():
    expected = load_file(GOLDEN / OUTPUTS)
    torch.manual_seed(1234)  # whatever the init, the checkpoint's weights must win
    policy = Llava3DFusionPolicy.from_pretrained(GOLDEN / CHECKPOINT)
    batch, noise, time = golden_inputs(policy)
    assert torch.equal(noise, expected["noise"]) and torch.equal(time, expected["time"])
    actions = policy.predict_action_chunk(batch, noise=noise)
    torch.testing.assert_close(actions, expected["actions"], atol=1e-5, rtol=1e-5)
    loss, _ = policy.forward(batch, noise=noise, time=time, reduction="none")
    torch.testing.assert_close(loss, expected["loss"], atol=1e-5, rtol=1e-5)
