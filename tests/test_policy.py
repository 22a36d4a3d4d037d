"""Behaviour of the policy: sampling paths agree, masks are right, training works, bad input fails."""

import draccus
import pytest
import torch
from helpers import ACTION_DIM, CHUNK, fixed_noise, preprocess, raw_batch, tiny_config, tiny_policy
from lerobot.optim import OptimizerConfig

from lerobot_llava3d_fusion.model.network import ModelInputs
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy
from lerobot_llava3d_fusion.optim import FusedAdamWConfig


@pytest.mark.parametrize("llm_type", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("expert_mode", ["shared", "separate"])
@pytest.mark.parametrize(
    "tasks", [("pick up the red block", "push"), ("push", "pull")], ids=["padded", "unpadded"]
)
def test_cache_and_no_cache_sample_the_same_actions(llm_type, expert_mode, tasks):
    policy = tiny_policy(tiny_llm_type=llm_type, expert_mode=expert_mode)
    batch = preprocess(policy, raw_batch(tasks=tasks))
    noise = fixed_noise(policy)
    policy.config.use_cache = True
    cached = policy.predict_action_chunk(batch, noise=noise)
    policy.config.use_cache = False
    uncached = policy.predict_action_chunk(batch, noise=noise)
    assert cached.shape == (2, CHUNK, ACTION_DIM)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)
    # The sample really depends on the noise (the comparison above is not vacuous).
    assert not torch.allclose(policy.predict_action_chunk(batch, noise=noise + 1.0), uncached)


def embedded_prefix(policy: Llava3DFusionPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix tokens (B, Lp, D) and pad mask (B, Lp) of a preprocessed two-camera batch."""
    batch = preprocess(policy, raw_batch())
    images = [batch[key] for key in policy.config.camera_keys]
    tokens, mask = batch["observation.language.tokens"], batch["observation.language.attention_mask"]
    prefix, prefix_mask, _ = policy.model.embed_prefix(images, [None, None], tokens, mask)
    return prefix, prefix_mask


def test_prefix_outputs_do_not_depend_on_the_suffix(policy):
    model = policy.model
    prefix, mask = embedded_prefix(policy)
    suffix_len, width = model.action_expert.suffix_length, model.fusion.expert_width
    suffix_a = torch.randn(2, suffix_len, width)
    suffix_b = torch.randn(2, suffix_len, width)
    prefix_a, out_a = model.fusion(prefix, mask, suffix_a, output_prefix=True)
    prefix_b, out_b = model.fusion(prefix, mask, suffix_b, output_prefix=True)
    assert torch.equal(prefix_a, prefix_b)
    assert not torch.allclose(out_a, out_b)
    # Skipping the prefix's unused last-layer tail does not change the suffix output.
    torch.testing.assert_close(model.fusion(prefix, mask, suffix_a), out_a, atol=1e-6, rtol=0)


def test_suffix_steps_reuse_the_prefix_cache_in_place(policy):
    model = policy.model
    prefix, mask = embedded_prefix(policy)
    suffix_len, width = model.action_expert.suffix_length, model.fusion.expert_width
    with torch.no_grad():
        cache = model.fusion.forward_prefix(prefix, mask, suffix_len)
        pointers = [k.data_ptr() for k in cache.keys]
        prefix_keys = [k[:, :, : cache.prefix_length].clone() for k in cache.keys]
        first = model.fusion.forward_suffix(torch.randn(2, suffix_len, width), cache)
        second = model.fusion.forward_suffix(torch.randn(2, suffix_len, width), cache)
    assert [k.data_ptr() for k in cache.keys] == pointers
    for before, after in zip(prefix_keys, cache.keys, strict=True):
        assert torch.equal(before, after[:, :, : cache.prefix_length])
    assert not torch.allclose(first, second)


def test_each_sample_of_a_padded_batch_gets_the_actions_it_gets_alone(policy):
    tasks = ["pick up the red block and put it in the bowl", "push"]
    batch = preprocess(policy, raw_batch(tasks=tasks))
    mask = batch["observation.language.attention_mask"]
    assert mask[0].sum() > mask[1].sum()  # the short prompt is padded
    noise = fixed_noise(policy)
    together = policy.predict_action_chunk(batch, noise=noise)
    for i in range(2):
        alone = raw_batch(tasks=tasks)
        alone = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else [v[i]] for k, v in alone.items()}
        single = policy.predict_action_chunk(preprocess(policy, alone), noise=noise[i : i + 1])
        torch.testing.assert_close(single[0], together[i], atol=1e-5, rtol=0)


def test_padding_the_prompt_does_not_change_the_actions(policy):
    batch = preprocess(policy, raw_batch())
    noise = fixed_noise(policy)
    reference = policy.predict_action_chunk(batch, noise=noise)
    torch.testing.assert_close(
        policy.predict_action_chunk(pad_prompt(batch), noise=noise), reference, atol=1e-5, rtol=0
    )


def pad_prompt(batch: dict, extra: int = 7) -> dict:
    """The same batch with `extra` padding tokens after every prompt."""
    padded = dict(batch)
    padded["observation.language.tokens"] = torch.nn.functional.pad(
        batch["observation.language.tokens"], (0, extra)
    )
    padded["observation.language.attention_mask"] = torch.nn.functional.pad(
        batch["observation.language.attention_mask"], (0, extra), value=False
    )
    return padded


@pytest.mark.parametrize("expert_mode", ["shared", "separate"])
def test_padding_the_prompt_does_not_change_the_training_loss(expert_mode):
    policy = tiny_policy(expert_mode=expert_mode)
    batch = preprocess(policy, raw_batch(tasks=["pick up the red block and put it in the bowl", "push"]))
    noise, time = fixed_noise(policy), torch.tensor([0.3, 0.8])
    reference, _ = policy.forward(batch, noise=noise, time=time)
    padded, _ = policy.forward(pad_prompt(batch), noise=noise, time=time)
    torch.testing.assert_close(padded, reference, atol=1e-6, rtol=0)
    assert reference > 0


def test_padded_action_dims_of_the_noise_change_neither_actions_nor_loss(policy):
    """Padded action dims (>= the robot's action dim) are invisible to the expert, in sampling and training."""
    batch = preprocess(policy, raw_batch())
    noise = fixed_noise(policy)
    other_noise = noise.clone()
    other_noise[..., ACTION_DIM:] = torch.randn_like(noise[..., ACTION_DIM:]) * 3
    actions = policy.predict_action_chunk(batch, noise=noise)
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=other_noise), actions, atol=0, rtol=0)

    time = torch.tensor([0.3, 0.8])
    loss, _ = policy.forward(batch, noise=noise, time=time)
    other_loss, _ = policy.forward(batch, noise=other_noise, time=time)
    torch.testing.assert_close(other_loss, loss, atol=0, rtol=0)


def test_sampling_keeps_padded_action_dims_at_zero(policy):
    batch = preprocess(policy, raw_batch())
    inputs = policy._prepare_inputs(batch)
    padded_actions = policy.model.sample_actions(inputs, fixed_noise(policy))
    assert padded_actions[..., :ACTION_DIM].abs().sum() > 0
    assert torch.equal(padded_actions[..., ACTION_DIM:], torch.zeros_like(padded_actions[..., ACTION_DIM:]))


@pytest.mark.parametrize("expert_mode", ["shared", "separate"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_expert_modes_train_with_finite_gradients(expert_mode, dtype):
    policy = tiny_policy(expert_mode=expert_mode, dtype=dtype)
    policy.train()
    batch = preprocess(policy, raw_batch())
    loss, info = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss) and info["loss"] > 0
    grads = {name: p.grad for name, p in policy.named_parameters() if p.requires_grad}
    # Only the prefix's last-layer tail (o_proj, MLP, final norm) feeds no loss in "separate" mode.
    unused = {n for n, g in grads.items() if g is None}
    last = len(policy.model.fusion.vlm_layers) - 1
    allowed = {"model.fusion.vlm_norm.weight"} | {
        n
        for n in grads
        if n.startswith(f"model.fusion.vlm_layers.{last}.")
        and "self_attn.o_proj" in n
        or n.startswith(f"model.fusion.vlm_layers.{last}.")
        and ("mlp" in n or "post_attention" in n)
    }
    assert unused <= (allowed if expert_mode == "separate" else set()), unused
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # The expert's layers get gradient in both modes (in "shared" they are the LLM's layers).
    expert_layer = policy.model.fusion.expert_layers[0].self_attn.q_proj.weight
    assert expert_layer.grad.abs().sum() > 0


def test_shared_mode_adds_no_transformer_parameters():
    shared = tiny_policy(expert_mode="shared")
    separate = tiny_policy(expert_mode="separate")
    count = lambda p: sum(x.numel() for x in p.model.fusion.parameters())  # noqa: E731
    assert count(shared) == sum(x.numel() for x in shared.model.fusion.vlm_layers.parameters()) + sum(
        x.numel() for x in shared.model.fusion.vlm_norm.parameters()
    )
    assert count(separate) > count(shared)


def test_loss_averages_only_real_action_steps_and_dims(policy):
    batch = preprocess(policy, raw_batch())
    noise = torch.randn(2, CHUNK, policy.config.max_action_dim)
    time = torch.full((2,), 0.5)
    is_pad = torch.zeros(2, CHUNK, dtype=torch.bool)
    is_pad[0, CHUNK // 2 :] = True
    batch["action_is_pad"] = is_pad
    loss, info = policy.forward(batch, noise=noise, time=time)

    images = [batch[key] for key in policy.config.camera_keys]
    state = torch.nn.functional.pad(batch["observation.state"], (0, policy.config.max_state_dim - 5))
    actions = torch.nn.functional.pad(batch["action"], (0, policy.config.max_action_dim - ACTION_DIM))
    inputs = ModelInputs(
        images,
        [None, None],
        batch["observation.language.tokens"],
        batch["observation.language.attention_mask"],
        state,
        camera_present=[None, None],
    )
    elements = policy.model(inputs, actions, noise=noise, time=time)
    expected = elements[:, :, :ACTION_DIM][~is_pad].mean()  # padded steps and padded dims excluded
    torch.testing.assert_close(loss, expected)
    assert info["loss"] == pytest.approx(expected.item())
    assert not torch.allclose(elements.mean(), expected)  # the masking matters


def test_select_action_serves_a_queue_and_reset_empties_it(policy):
    policy.config.n_action_steps = 3
    policy.reset()
    batch = preprocess(policy, raw_batch())
    noise = fixed_noise(policy)
    chunk = policy.predict_action_chunk(batch, noise=noise)
    served = [policy.select_action(batch, noise=noise) for _ in range(3)]
    for step, action in enumerate(served):
        torch.testing.assert_close(action, chunk[:, step])
    assert len(policy._action_queue) == 0
    policy.select_action(batch, noise=noise)
    assert len(policy._action_queue) == 2
    policy.reset()
    assert len(policy._action_queue) == 0


def test_freeze_flags_select_the_trained_parameters():
    frozen_vision = tiny_policy(freeze_vision_encoder=True)
    names = {n for n, _ in frozen_vision.named_parameters()}
    trained = {id(p) for p in frozen_vision.get_optim_params()}
    vision = list(frozen_vision.model.image_encoder.vision_tower.parameters())
    assert vision and not any(id(p) in trained for p in vision)
    assert any(id(p) in trained for p in frozen_vision.model.fusion.vlm_layers.parameters())

    expert_only = tiny_policy(train_expert_only=True, expert_mode="separate")
    trained = {id(p) for p in expert_only.get_optim_params()}
    assert not any(id(p) in trained for p in expert_only.model.fusion.vlm_layers.parameters())
    assert not any(id(p) in trained for p in expert_only.model.embed_tokens.parameters())
    assert all(id(p) in trained for p in expert_only.model.fusion.expert_layers.parameters())
    assert all(id(p) in trained for p in expert_only.model.action_expert.parameters())
    assert len(names) > len(trained)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_train_expert_only_runs_no_backward_through_the_frozen_vlm_stream(gradient_checkpointing):
    """With the VLM frozen its stream needs no gradient: its MLPs record no autograd graph (nothing kept
    for the backward pass) and are not recomputed by checkpointing, and the expert's gradients are
    those of the same weights with the VLM trained."""
    batch = preprocess(tiny_policy(), raw_batch())
    noise, time = fixed_noise(tiny_policy()), torch.tensor([0.3, 0.8])

    def expert_gradients(policy: Llava3DFusionPolicy) -> dict[str, torch.Tensor]:
        policy.train()
        loss, _ = policy.forward(batch, noise=noise, time=time)
        loss.backward()
        trained = (policy.model.fusion.separate_expert_layers, policy.model.action_expert)
        return {name: p.grad for module in trained for name, p in module.named_parameters()}

    expert_only = tiny_policy(
        expert_mode="separate", train_expert_only=True, gradient_checkpointing=gradient_checkpointing
    )
    vlm_mlp_output_needs_grad = []  # one entry per call of a VLM layer's MLP
    for layer in expert_only.model.fusion.vlm_layers:
        layer.mlp.register_forward_hook(
            lambda module, args, output: vlm_mlp_output_needs_grad.append(output.requires_grad)
        )
    gradients = expert_gradients(expert_only)
    reference = expert_gradients(tiny_policy(expert_mode="separate"))

    # One call per layer but the last (whose prefix output feeds nothing), none in the backward pass.
    assert len(vlm_mlp_output_needs_grad) == len(expert_only.model.fusion.vlm_layers) - 1
    assert not any(vlm_mlp_output_needs_grad)
    assert gradients.keys() == reference.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_optimizer_preset_is_adamw_with_the_fused_kernel():
    fused_policy = tiny_policy(seed=0)
    preset = fused_policy.config.get_optimizer_preset()
    assert isinstance(preset, FusedAdamWConfig) and preset.fused
    # The preset is what lerobot-train saves in train_config.json and parses back on resume.
    assert preset.type == "llava3d_fusion_adamw"
    assert draccus.decode(OptimizerConfig, {"type": preset.type, **draccus.encode(preset)}) == preset

    loop_policy = tiny_policy(seed=0, optimizer_fused=False)
    batch = preprocess(fused_policy, raw_batch())
    noise, time = fixed_noise(fused_policy), torch.full((2,), 0.5)
    results = []
    for policy in (fused_policy, loop_policy):
        optimizer = policy.config.get_optimizer_preset().build(policy.get_optim_params())
        assert isinstance(optimizer, torch.optim.AdamW)
        assert bool(optimizer.defaults["fused"]) == policy.config.optimizer_fused
        loss, _ = policy.forward(batch, noise=noise, time=time)
        loss.backward()
        optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in policy.get_optim_params()]))
    # One step moves every parameter by about lr; both kernels must agree on where to.
    moved = (
        results[0] - torch.cat([p.detach().flatten() for p in tiny_policy(seed=0).get_optim_params()])
    ).abs()
    assert moved.max() > 0.5 * fused_policy.config.optimizer_lr
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)


@pytest.mark.transformers_range
def test_save_and_load_give_identical_actions(policy, tmp_path):
    batch = preprocess(policy, raw_batch())
    noise = fixed_noise(policy)
    before = policy.predict_action_chunk(batch, noise=noise)
    policy.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    torch.manual_seed(123)  # a different init must be overwritten by the checkpoint
    loaded = Llava3DFusionPolicy.from_pretrained(tmp_path)
    assert torch.equal(loaded.predict_action_chunk(batch, noise=noise), before)


def test_tiny_model_overfits_a_few_samples():
    policy = tiny_policy(seed=0, expert_mode="separate", expert_width_multiplier=1.0)
    batch = preprocess(policy, raw_batch(batch_size=2, tasks=["go left", "go right"]))
    optimizer = torch.optim.AdamW(policy.get_optim_params(), lr=3e-3)
    policy.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(300):
        loss, _ = policy.forward(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 10, (first, last)
    policy.config.num_steps = 10
    sampled = policy.predict_action_chunk(batch, noise=fixed_noise(policy))
    target = batch["action"]
    error = (sampled - target).abs().mean()
    baseline = (target - target.mean()).abs().mean()  # predicting the mean action
    assert error < 0.3 * baseline, (error.item(), baseline.item())


# ------------------------------------------------------------------------------- bad inputs


def test_missing_camera_raises(policy):
    batch = preprocess(policy, raw_batch())
    del batch["observation.images.wrist"]
    with pytest.raises(KeyError, match="observation.images.wrist"):
        policy.predict_action_chunk(batch)


def test_wrong_state_size_raises(policy):
    batch = preprocess(policy, raw_batch())
    batch["observation.state"] = torch.randn(2, 7)
    with pytest.raises(ValueError, match="observation.state"):
        policy.predict_action_chunk(batch)


def test_wrong_action_size_raises(policy):
    batch = preprocess(policy, raw_batch())
    batch["action"] = torch.randn(2, CHUNK, ACTION_DIM + 1)
    with pytest.raises(ValueError, match="action"):
        policy.forward(batch)


@pytest.mark.parametrize("key", ["observation.state", "observation.images.top", "action"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(policy, key, bad):
    batch = preprocess(policy, raw_batch())
    batch[key] = batch[key].clone()
    batch[key].view(-1)[0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        policy.forward(batch)


@pytest.mark.parametrize("task", ["", "   "])
def test_empty_task_raises(policy, task):
    with pytest.raises(ValueError, match="empty task"):
        preprocess(policy, raw_batch(tasks=["pick", task]))


def test_empty_language_mask_raises(policy):
    batch = preprocess(policy, raw_batch())
    batch["observation.language.attention_mask"] = torch.zeros_like(
        batch["observation.language.attention_mask"]
    )
    with pytest.raises(ValueError, match="empty task"):
        policy.predict_action_chunk(batch)


def test_wrong_noise_shape_raises(policy):
    batch = preprocess(policy, raw_batch())
    with pytest.raises(ValueError, match="noise"):
        policy.predict_action_chunk(batch, noise=torch.randn(2, CHUNK, ACTION_DIM))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_action_steps": 10, "chunk_size": 5}, "n_action_steps"),
        ({"expert_mode": "cross"}, "expert_mode"),
        ({"time_sampling": "normal"}, "time_sampling"),
        ({"expert_width_multiplier": 1.5}, "expert_width_multiplier"),
        ({"num_steps": 0}, "num_steps"),
        ({"dtype": "float16"}, "dtype"),
        ({"train_expert_only": True, "expert_mode": "shared"}, "train_expert_only"),
        ({"compile_mode": "fast"}, "compile_mode"),
        ({"geometry_max_depth": 0.0}, "geometry_max_depth"),
        ({"camera_intrinsics": {"top": [[1.0, 0.0], [0.0, 1.0]]}}, "camera_intrinsics"),
        ({"camera_extrinsics": {"top": [[1.0, 0.0, 0.0]] * 3}}, "camera_extrinsics"),
        ({"min_period": 5.0, "max_period": 4.0}, "min_period"),
        ({"time_sampling_beta_alpha": 0.0}, "time_sampling_beta_alpha"),
        ({"time_sampling_offset": 0.5, "time_sampling_scale": 0.9}, "time_sampling_offset"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_combinations_that_cannot_run_fail_at_construction():
    # 0.3 x the tiny LLM's 64 channels is 19: the sinusoidal time embedding needs an even width.
    with pytest.raises(ValueError, match="expert_width_multiplier=0.3 .*odd width.*0.3125"):
        tiny_policy(expert_width_multiplier=0.3)
    assert tiny_policy(expert_width_multiplier=0.3125).model.fusion.expert_width == 20
    with pytest.raises(ValueError, match=r"camera_intrinsics names cameras \['front'\]"):
        tiny_policy(camera_intrinsics={"front": [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]]})


def test_dataset_without_camera_or_action_is_rejected():
    config = tiny_config(input_features={})
    with pytest.raises(ValueError, match="camera"):
        config.validate_features()
    config = tiny_config(output_features={})
    with pytest.raises(ValueError, match="action"):
        config.validate_features()


def test_head_shape_mismatch_is_rejected(policy):
    from lerobot_llava3d_fusion.model.fusion import check_head_shapes

    vlm_layers = policy.model.fusion.vlm_layers
    wrong = torch.nn.ModuleList(
        [type(vlm_layers[0])(_narrow_heads(vlm_layers), layer_idx=0)] * len(vlm_layers)
    )
    with pytest.raises(ValueError, match="head_dim"):
        check_head_shapes(vlm_layers, wrong)


def _narrow_heads(vlm_layers):
    import copy

    config = copy.deepcopy(vlm_layers[0].self_attn.config)
    config.head_dim = config.head_dim // 2
    return config


def test_expert_widths_follow_the_multipliers():
    policy = tiny_policy(expert_mode="separate", expert_width_multiplier=0.5, expert_mlp_multiplier=0.25)
    llm_layer, expert_layer = policy.model.fusion.vlm_layers[0], policy.model.fusion.expert_layers[0]
    assert expert_layer.self_attn.q_proj.in_features == llm_layer.self_attn.q_proj.in_features // 2
    assert expert_layer.mlp.up_proj.out_features == llm_layer.mlp.up_proj.out_features // 4
    # Same attention space: heads x head_dim of queries and keys match the LLM's.
    assert expert_layer.self_attn.q_proj.out_features == llm_layer.self_attn.q_proj.out_features
    assert expert_layer.self_attn.k_proj.out_features == llm_layer.self_attn.k_proj.out_features


@pytest.mark.slow
def test_compiled_denoising_step_samples_the_same_actions():
    batch = preprocess(tiny_policy(), raw_batch())
    noise = fixed_noise(tiny_policy())
    eager = tiny_policy().predict_action_chunk(batch, noise=noise)
    compiled = tiny_policy(compile_model=True).predict_action_chunk(batch, noise=noise)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- training times


@pytest.mark.parametrize("method", ["uniform", "beta"])
def test_training_times_cover_the_interval_of_their_method(method):
    """uniform: the whole [0, 1] as the original system draws it; beta: pi0's [0.001, 1]."""
    from lerobot_llava3d_fusion.model.flow_matching import sample_time

    config = tiny_config(time_sampling=method)
    torch.manual_seed(0)
    times = sample_time(200_000, torch.device("cpu"), method, 1.5, 1.0, *config.time_sampling_range)
    assert 0.0 <= times.min() and times.max() <= 1.0
    near_zero = (times < 0.001).float().mean().item()  # the thousandth that [0.001, 1] leaves out
    if method == "uniform":
        assert 0.0005 < near_zero < 0.002, near_zero  # about 0.1 % of U(0, 1)
        assert times.mean().item() == pytest.approx(0.5, abs=0.005)
        assert times.max() > 0.999
    else:
        assert near_zero == 0.0 and times.min() >= 0.001


def test_explicit_time_range_reaches_the_loss(monkeypatch):
    """time_sampling_scale / offset, when set, bound the times the training loss is computed at."""
    policy = tiny_policy(time_sampling="uniform", time_sampling_offset=0.25, time_sampling_scale=0.5)
    assert policy.config.time_sampling_range == (0.5, 0.25)
    expert = policy.model.action_expert
    seen = []
    compute_loss = expert.compute_loss

    def recording_compute_loss(transformer, state, actions, noise, time):
        seen.append(time.detach().clone())
        return compute_loss(transformer, state, actions, noise, time)

    monkeypatch.setattr(expert, "compute_loss", recording_compute_loss)
    batch = preprocess(policy, raw_batch(batch_size=2))
    for _ in range(20):
        policy.forward(batch)
    times = torch.cat(seen)
    assert len(times) == 40 and times.min() >= 0.25 and times.max() <= 0.75
    assert times.max() - times.min() > 0.25  # drawn over the interval, not a constant
