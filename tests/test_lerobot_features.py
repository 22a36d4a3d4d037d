"""LeRobot's VLA features on the tiny policy: real-time chunking, gradient checkpointing, PEFT/LoRA,
empty cameras, relative actions and FSDP units."""

import pytest
import torch
from helpers import (
    ACTION_DIM,
    CAMERAS,
    CHUNK,
    fixed_noise,
    noise_for,
    preprocess,
    raw_batch,
    tiny_config,
    tiny_policy,
)
from lerobot.policies.rtc.action_queue import ActionQueue
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.rollout.inference.rtc import supports_rtc_inference

from lerobot_llava3d_fusion import make_llava3d_fusion_pre_post_processors
from lerobot_llava3d_fusion.model import fusion
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

# ---- Real-time chunking ------------------------------------------------------------------------------


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def enable_rtc_like_lerobot_rollout(policy: Llava3DFusionPolicy, **rtc) -> RTCConfig:
    """What `lerobot-rollout --inference.type=rtc` does to a policy (lerobot.rollout.context)."""
    assert supports_rtc_inference(policy)
    policy.config.rtc_config = RTCConfig(**rtc)
    policy.init_rtc_processor()
    return policy.config.rtc_config


def test_rtc_guidance_makes_the_new_chunk_continue_the_left_over_chunk(monkeypatch):
    policy = tiny_policy()
    rtc_config = enable_rtc_like_lerobot_rollout(policy, execution_horizon=4, max_guidance_weight=10.0)
    prefix_calls = count_calls(monkeypatch, policy.model.fusion, "forward_prefix")
    step_calls = count_calls(monkeypatch, policy.model, "denoise_step")

    # The RTC engine's loop: a chunk into LeRobot's action queue, two actions executed while the next
    # chunk is computed from a new observation with the queue's left-over as guidance.
    queue = ActionQueue(rtc_config)
    first = policy.predict_action_chunk(preprocess(policy, raw_batch(1, seed=0)), inference_delay=0)
    queue.merge(first[0], first[0], real_delay=0, action_index_before_inference=0)
    executed = 2
    for _ in range(executed):
        queue.get()
    left_over = queue.get_left_over()  # (CHUNK - 2, action_dim), normalized model space
    assert left_over.shape == (CHUNK - executed, ACTION_DIM)

    batch, noise = preprocess(policy, raw_batch(1, seed=5)), fixed_noise(policy, batch_size=1)
    prefix_calls[0] = step_calls[0] = 0
    guided = policy.predict_action_chunk(
        batch, noise=noise, inference_delay=executed, prev_chunk_left_over=left_over
    )
    assert prefix_calls[0] == 1  # the prefix KV cache is built once per chunk ...
    assert step_calls[0] == policy.config.num_steps  # ... and every Euler step reuses it
    free = policy.predict_action_chunk(
        batch, noise=noise, inference_delay=executed, prev_chunk_left_over=None
    )

    frozen = slice(0, executed)  # actions that run during inference: weight 1 in the guidance
    guided_gap = (guided[0, frozen] - left_over[frozen]).abs().mean()
    free_gap = (free[0, frozen] - left_over[frozen]).abs().mean()
    assert guided_gap < 0.2 * free_gap, (guided_gap, free_gap)


def test_rtc_inputs_are_checked(policy):
    batch = preprocess(policy, raw_batch(1))
    with pytest.raises(ValueError, match="rtc_config"):
        policy.predict_action_chunk(batch, inference_delay=1, prev_chunk_left_over=torch.zeros(4, ACTION_DIM))
    enable_rtc_like_lerobot_rollout(policy)
    with pytest.raises(ValueError, match="prev_chunk_left_over"):
        policy.predict_action_chunk(
            batch, inference_delay=1, prev_chunk_left_over=torch.zeros(4, ACTION_DIM + 1)
        )
    with pytest.raises(ValueError, match="inference_delay"):
        policy.predict_action_chunk(batch, prev_chunk_left_over=torch.zeros(4, ACTION_DIM))
    relative = tiny_policy(use_relative_actions=True)
    enable_rtc_like_lerobot_rollout(relative)
    with pytest.raises(ValueError, match="use_relative_actions"):
        relative.select_action(batch)


def test_select_action_with_rtc_continues_the_unexecuted_actions(monkeypatch):
    """lerobot-eval with rtc_config enabled: each re-plan is guided by the previous chunk's tail."""
    n_steps = 2
    policies = {rtc: tiny_policy(n_action_steps=n_steps) for rtc in (False, True)}
    enable_rtc_like_lerobot_rollout(policies[True], execution_horizon=CHUNK - n_steps)
    # Noise drawn afresh for every chunk, as in evaluation; the same draws for both policies.
    batch = preprocess(policies[True], raw_batch(1, seed=5))
    chunks = {}
    for rtc, policy in policies.items():
        policy.reset()
        calls = []
        predict = policy.predict_action_chunk
        monkeypatch.setattr(
            policy, "predict_action_chunk", lambda *a, _p=predict, _c=calls, **k: _c.append(k) or _p(*a, **k)
        )
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():  # as lerobot-eval calls it
            executed = [
                policy.select_action(batch, noise=torch.randn(1, CHUNK, 4, generator=generator))
                for _ in range(2 * n_steps)
            ]
        chunks[rtc] = (torch.stack(executed, dim=1), calls)

    actions, calls = chunks[True]
    assert calls[0]["prev_chunk_left_over"] is None  # nothing planned before the first chunk
    left_over = calls[1]["prev_chunk_left_over"]
    assert calls[1]["inference_delay"] == 0 and left_over.shape == (1, CHUNK - n_steps, ACTION_DIM)
    free_actions, free_calls = chunks[False]
    assert all(call["prev_chunk_left_over"] is None for call in free_calls)
    torch.testing.assert_close(actions[:, :n_steps], free_actions[:, :n_steps])  # same first chunk
    # The second chunk's executed actions follow what the first chunk had planned for those steps.
    guided_gap = (actions[:, n_steps:] - left_over[:, :n_steps]).abs().mean()
    free_gap = (free_actions[:, n_steps:] - left_over[:, :n_steps]).abs().mean()
    assert guided_gap < 0.3 * free_gap, (guided_gap, free_gap)
    policies[True].reset()
    assert policies[True]._unexecuted_actions is None  # a new episode starts without a plan


def test_rtc_config_is_validated_against_the_chunk():
    with pytest.raises(ValueError, match="execution_horizon"):
        tiny_config(rtc_config=RTCConfig(execution_horizon=CHUNK + 1))


# ---- Gradient checkpointing --------------------------------------------------------------------------


@pytest.mark.parametrize("expert_mode", ["shared", "separate"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(monkeypatch, expert_mode):
    batch = preprocess(tiny_policy(), raw_batch(2))
    noise = noise_for(CHUNK, 4, seed=3)
    time = torch.tensor([0.3, 0.8])

    def loss_and_grads(policy):
        policy.train()
        loss, _ = policy.forward(batch, noise=noise, time=time)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(tiny_policy(expert_mode=expert_mode))
    checkpointed = tiny_policy(expert_mode=expert_mode, gradient_checkpointing=True)
    recomputed = count_calls(monkeypatch, fusion, "checkpoint")
    loss, grads = loss_and_grads(checkpointed)

    assert recomputed[0] == len(checkpointed.model.fusion.vlm_layers)  # every fused layer checkpointed
    torch.testing.assert_close(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_is_off_at_inference(monkeypatch):
    policy = tiny_policy(gradient_checkpointing=True)
    recomputed = count_calls(monkeypatch, fusion, "checkpoint")
    policy.predict_action_chunk(preprocess(policy, raw_batch(1)))
    policy.eval()
    with torch.no_grad():
        policy.forward(preprocess(policy, raw_batch(2)))
    assert recomputed[0] == 0


# ---- Empty cameras -----------------------------------------------------------------------------------


def test_empty_cameras_are_declared_masked_and_change_nothing():
    with_empty = tiny_policy(empty_cameras=2)
    assert [k for k in with_empty.config.camera_keys if "empty_camera" in k] == [
        "observation.images.empty_camera_0",
        "observation.images.empty_camera_1",
    ]
    without = tiny_policy()
    torch.testing.assert_close(with_empty.state_dict(), without.state_dict())  # no per-camera weights

    batch = preprocess(with_empty, raw_batch(2))  # no empty_camera_* key: as a dataset or robot sends
    assert not any("empty_camera" in key for key in batch)
    noise = fixed_noise(with_empty, batch_size=2)
    torch.testing.assert_close(
        with_empty.predict_action_chunk(batch, noise=noise),
        without.predict_action_chunk(batch, noise=noise),
        atol=1e-5,
        rtol=0,
    )
    with_empty.train()
    loss, _ = with_empty.forward(batch)
    assert torch.isfinite(loss)


def test_a_missing_real_camera_still_raises_with_empty_cameras():
    policy = tiny_policy(empty_cameras=1)
    batch = preprocess(policy, raw_batch(1))
    del batch[CAMERAS[0]]
    with pytest.raises(KeyError, match=CAMERAS[0]):
        policy.predict_action_chunk(batch)


def test_empty_cameras_must_not_be_negative():
    with pytest.raises(ValueError, match="empty_cameras"):
        tiny_config(empty_cameras=-1)


# ---- Relative actions --------------------------------------------------------------------------------


def test_relative_actions_train_on_offsets_and_come_back_absolute():
    names = ["joint_a", "joint_b", "gripper"]
    policy = tiny_policy(use_relative_actions=True, action_feature_names=names)
    preprocessor, postprocessor = make_llava3d_fusion_pre_post_processors(policy.config, dataset_stats=None)
    raw = raw_batch(2)
    state, actions = raw["observation.state"].clone(), raw["action"].clone()

    batch = preprocessor(raw)
    expected = actions.clone()
    expected[..., :2] -= state[:, None, :2]  # the gripper (excluded by default) stays absolute
    torch.testing.assert_close(batch["action"], expected)

    predicted = policy.predict_action_chunk(batch, noise=fixed_noise(policy, batch_size=2))
    absolute = postprocessor(predicted)
    back = predicted.clone()
    back[..., :2] += state[:, None, :2]
    torch.testing.assert_close(absolute, back)


def test_relative_action_steps_are_off_by_default_and_saved_by_name(tmp_path):
    policy = tiny_policy()
    preprocessor, postprocessor = make_llava3d_fusion_pre_post_processors(policy.config, dataset_stats=None)
    raw = raw_batch(1)
    torch.testing.assert_close(preprocessor(raw_batch(1))["action"], raw["action"])
    preprocessor.save_pretrained(tmp_path)
    postprocessor.save_pretrained(tmp_path)
    saved = (tmp_path / "policy_preprocessor.json").read_text() + (
        tmp_path / "policy_postprocessor.json"
    ).read_text()
    assert "relative_actions_processor" in saved and "absolute_actions_processor" in saved


# ---- PEFT / LoRA and FSDP ----------------------------------------------------------------------------


@pytest.mark.parametrize("expert_mode", ["shared", "separate"])
def test_lora_defaults_adapt_the_fused_layers_and_train_the_head(expert_mode, tmp_path):
    pytest.importorskip("peft")
    policy = tiny_policy(expert_mode=expert_mode)
    policy.config.pretrained_path = tmp_path  # fine-tuning a trained policy
    wrapped = policy.wrap_with_peft(peft_cli_overrides={"method_type": "LORA", "r": 4})
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trained and all(("lora_" in n) or (".modules_to_save." in n) for n in trained), trained
    adapted = {n.split(".lora_")[0] for n in trained if "lora_" in n}
    for stream in ["vlm_layers"] + (["separate_expert_layers"] if expert_mode == "separate" else []):
        for proj in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            assert any(f"{stream}.0.{proj}" in n for n in adapted), (stream, proj)
    assert any("action_expert.modules_to_save" in n for n in trained)
    assert not any("vision_tower" in n or "embed_tokens" in n for n in trained)

    batch = preprocess(policy, raw_batch(2))
    wrapped.train()
    loss, _ = wrapped.forward(batch)
    loss.backward()
    last = len(policy.model.fusion.vlm_layers) - 1
    without_grad = [n for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is None]
    # Only the prefix output of the last layer feeds nothing in training (see fusion.forward).
    assert all(
        f"vlm_layers.{last}.self_attn.o_proj" in n or f"vlm_layers.{last}.mlp" in n for n in without_grad
    ), without_grad


def test_lora_in_bf16_stores_the_frozen_base_in_bf16_and_trains_float32_adapters(tmp_path):
    pytest.importorskip("peft")
    policy = tiny_policy(dtype="bfloat16")
    policy.config.pretrained_path = tmp_path
    wrapped = policy.wrap_with_peft(peft_cli_overrides={"method_type": "LORA", "r": 4})
    dtypes = {n: (p.requires_grad, p.dtype) for n, p in wrapped.named_parameters()}
    assert {dtype for trained, dtype in dtypes.values() if trained} == {torch.float32}
    assert {dtype for trained, dtype in dtypes.values() if not trained} == {torch.bfloat16}
    batch = preprocess(policy, raw_batch(2))
    wrapped.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = wrapped.forward(batch)
    loss.backward()
    # (the last VLM layer's o_proj and MLP feed no loss: their adapters get no gradient)
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_B" in n and p.grad is not None]
    assert torch.isfinite(loss) and len(grads) > 10
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_lora_needs_a_policy_checkpoint_and_says_how_to_get_one():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="train_expert_only"):
        tiny_policy().wrap_with_peft(peft_cli_overrides={"method_type": "LORA"})


def test_fsdp_units_are_the_mlp_blocks_of_both_streams():
    policy = tiny_policy(expert_mode="separate")
    units = policy._no_split_modules
    assert units == [type(policy.model.fusion.vlm_layers[0].mlp).__name__]
    from accelerate.utils.dataclasses import get_module_class_from_name

    assert get_module_class_from_name(policy, units[0]) is type(policy.model.fusion.expert_layers[0].mlp)
