"""bench/plateau.py: the plateau exit read from a training log, and the action expert's attention it
records, checked against the model's own attention output on a tiny policy."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fixed_noise, preprocess, raw_batch, tiny_policy

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def plateau():
    sys.path.insert(0, str(BENCH))  # the script imports the benches' `common`
    try:
        spec = importlib.util.spec_from_file_location("plateau_bench", BENCH / "plateau.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_logged_losses_take_their_steps_from_the_line_order(plateau, tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "INFO ot_train.py:641 step:100 smpl:3K ep:9 epch:0.1 loss:0.912 grdn:1.9 lr:1.0e-03\n"
        "Training:  50%|#####     | noise without a loss\n"
        "INFO ot_train.py:641 step:200 smpl:6K ep:19 epch:0.2 loss:0.410 grdn:1.7 lr:1.0e-03\n"
        "INFO ot_train.py:641 step:1K smpl:10K ep:30 epch:0.3 loss:0.120 grdn:1.1 lr:9.0e-04\n"
    )
    assert plateau.logged_losses(log, log_freq=100) == [(100, 0.912), (200, 0.41), (300, 0.12)]


def test_plateau_exit_is_the_first_step_the_loss_stays_below_the_threshold(plateau):
    losses = [(100, 0.9), (200, 0.4), (300, 0.2), (400, 0.41), (500, 0.24), (600, 0.1)]
    assert plateau.plateau_exit(losses, exit_loss=0.25) == 500  # the dip at 300 does not count
    assert plateau.plateau_exit(losses, exit_loss=0.05) is None
    assert plateau.plateau_exit(losses, exit_loss=1.0) == 100


def test_colour_bound_step_is_the_first_checkpoint_from_which_a_swap_costs_the_ratio(plateau):
    def probe(own, swapped):
        return {"loss_first_frames": own, "loss_first_frames_colour_swapped": swapped}

    probes = {
        2400: probe(0.2, 1.9),
        800: probe(0.6, 0.6),
        1200: probe(0.5, 1.2),  # bound once, then not: does not count
        1600: probe(0.45, 0.5),
        2000: probe(0.3, 0.6),  # exactly the ratio counts
    }
    assert plateau.colour_bound_step(probes, ratio=2.0) == 2000
    assert plateau.colour_bound_step(probes, ratio=5.0) == 2400
    assert plateau.colour_bound_step(probes, ratio=20.0) is None


def test_losses_by_frames_to_end_group_each_sample_once(plateau):
    frames_to_end = np.array([0, 1, 5, 12, 40, 2])
    own = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.8, 0.2])
    swapped = own * 2
    groups = plateau.losses_by_frames_to_end(frames_to_end, own, swapped)
    assert list(groups) == ["0-1", "2-3", "4-5", "10+"]  # no sample 6-9 frames before the end
    assert sum(group["samples"] for group in groups.values()) == len(own)
    assert groups["0-1"]["loss"] == pytest.approx(0.2) and groups["0-1"][
        "loss_colour_swapped"
    ] == pytest.approx(0.4)
    assert groups["10+"]["samples"] == 2 and groups["10+"]["loss"] == pytest.approx(0.7)


def test_colour_position_is_the_one_token_that_differs(plateau):
    own = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8]])
    swapped = torch.tensor([[5, 6, 3, 8], [5, 2, 9, 8]])
    assert plateau.colour_key_positions(own, swapped).tolist() == [2, 1]
    with pytest.raises(ValueError, match="exactly one token"):
        plateau.colour_key_positions(own, own)


def test_recorded_attention_is_the_expert_queries_softmax_and_leaves_the_loss_unchanged(plateau):
    policy = tiny_policy().eval()
    batch = preprocess(policy, raw_batch(tasks=["pick up the red block", "pick up the blue block"]))
    noise, time = fixed_noise(policy), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        expected, _ = policy.forward(batch, noise=noise, time=time, reduction="none")
        records = []
        suffix = policy.model.action_expert.suffix_length
        with plateau.recorded_suffix_attention(suffix, records):
            recorded_loss, _ = policy.forward(batch, noise=noise, time=time, reduction="none")
    torch.testing.assert_close(recorded_loss, expected)
    assert len(records) == len(policy.model.fusion.vlm_layers)  # one per fused layer
    for probabilities in records:  # (B, Ls, Lk): one distribution over the keys per expert query
        assert probabilities.shape[:2] == (2, suffix)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, suffix))
        assert bool((probabilities >= 0).all())


def test_a_recorder_that_does_not_match_the_model_is_refused(plateau, monkeypatch):
    policy = tiny_policy().eval()
    batch = preprocess(policy, raw_batch())
    original = plateau.fusion._attend
    # An attention whose output is not its softmax applied to the values (here: scaled by 2).
    monkeypatch.setattr(plateau.fusion, "_attend", lambda *args: 2.0 * original(*args))
    suffix = policy.model.action_expert.suffix_length
    recorder = plateau.recorded_suffix_attention(suffix, [])
    with recorder, torch.no_grad(), pytest.raises(RuntimeError, match="reproduce"):
        policy.forward(batch, noise=fixed_noise(policy), time=torch.tensor([0.3, 0.7]))
