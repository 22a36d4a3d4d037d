"""dtype=bfloat16 as LeRobot users run it: float32 master weights for what trains, bf16 compute.

`lerobot-train` turns on Accelerate's bf16 autocast from `policy.dtype`; on CPU that is
`torch.autocast("cpu", dtype=torch.bfloat16)`, which these tests use around the forward pass.
"""

import pytest
import torch
from helpers import fixed_noise, preprocess, raw_batch, tiny_policy

SMALLEST_DECAYED_LR = 2.5e-6  # the LIBERO presets' `scheduler_decay_lr`


def bf16_policy(**overrides):
    return tiny_policy(dtype="bfloat16", freeze_vision_encoder=True, **overrides)


def test_trainable_parameters_keep_float32_master_weights_and_frozen_ones_are_bf16():
    policy = bf16_policy()
    trainable = {name: p.dtype for name, p in policy.named_parameters() if p.requires_grad}
    frozen = {name: p.dtype for name, p in policy.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    assert all(name.startswith("model.image_encoder.vision_tower.") for name in frozen)

    expert_only = bf16_policy(train_expert_only=True)
    vlm_weight = expert_only.model.fusion.vlm_layers[0].self_attn.q_proj.weight
    expert_weight = expert_only.model.fusion.expert_layers[0].self_attn.q_proj.weight
    assert vlm_weight.dtype == torch.bfloat16 and expert_weight.dtype == torch.float32


def one_training_step(policy, lr: float, seed: int = 0) -> tuple[dict, dict]:
    """One step of the policy's own optimizer preset at `lr`, forward under bf16 autocast as
    Accelerate runs it: (parameters before, gradients) of every trainable tensor."""
    policy.train()
    batch = preprocess(policy, raw_batch(seed=seed))
    preset = policy.config.get_optimizer_preset()
    preset.lr = lr
    optimizer = preset.build(policy.get_optim_params())
    named = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in named.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = policy.forward(batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in named.items() if p.grad is not None}
    optimizer.step()
    return before, grads


@pytest.mark.parametrize("expert_mode", ["separate", "shared"])
def test_one_bf16_optimizer_step_at_the_smallest_lr_changes_every_trained_tensor(expert_mode):
    policy = bf16_policy(expert_mode=expert_mode)
    before, grads = one_training_step(policy, SMALLEST_DECAYED_LR)
    params = dict(policy.named_parameters())
    with_gradient = [name for name, grad in grads.items() if grad.abs().sum() > 0]
    changed = [name for name in with_gradient if not torch.equal(params[name].detach(), before[name])]
    assert len(with_gradient) > 20
    assert len(changed) >= 0.99 * len(with_gradient), sorted(set(with_gradient) - set(changed))
    # Norm weights sit at 1.0, where bf16's spacing (2**-7) swallows any step below 4e-3.
    norms = [name for name in with_gradient if "norm" in name]
    assert norms and all(name in changed for name in norms)
    # Each changed tensor moved by about lr (AdamW's first step is lr * sign(grad)), not by rounding.
    for name in changed:
        step = (params[name].detach() - before[name]).abs().max().item()
        assert step == pytest.approx(SMALLEST_DECAYED_LR, rel=0.05), (name, step)


def test_bf16_policy_computes_in_bf16_and_samples_close_to_float32():
    float32 = tiny_policy(freeze_vision_encoder=True)
    bf16 = bf16_policy()
    bf16.load_state_dict(float32.state_dict())  # same weights; the frozen tower is rounded to bf16
    batch = preprocess(float32, raw_batch())
    noise = fixed_noise(float32)

    output_dtypes = []
    layer = bf16.model.fusion.vlm_layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda module, args, out: output_dtypes.append(out.dtype))
    try:
        actions = bf16.predict_action_chunk(batch, noise=noise)
    finally:
        handle.remove()
    assert output_dtypes and set(output_dtypes) == {torch.bfloat16}
    assert actions.dtype == torch.float32
    reference = float32.predict_action_chunk(batch, noise=noise)
    error = (actions - reference).abs().max().item()
    assert 0 < error < 0.1, error  # bf16 rounding, not a different computation


def test_float32_policy_does_not_autocast():
    policy = tiny_policy()
    output_dtypes = []
    layer = policy.model.fusion.vlm_layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda module, args, out: output_dtypes.append(out.dtype))
    policy.predict_action_chunk(preprocess(policy, raw_batch()))
    assert set(output_dtypes) == {torch.float32}


def test_back_projection_stays_float32_under_bf16_autocast():
    from lerobot_llava3d_fusion.geometry.patch_points import backproject_depth

    depth = 0.5 + torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    intrinsics = torch.tensor([[10.0, 0.0, 5.5], [0.0, 10.0, 5.5], [0.0, 0.0, 1.0]])
    angle = torch.tensor(0.3)
    extrinsics = torch.eye(4)
    extrinsics[:2, :2] = torch.stack(
        [torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])]
    )
    extrinsics[:3, 3] = torch.tensor([0.4, -0.2, 1.1])
    reference, _ = backproject_depth(depth, intrinsics, extrinsics)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        points, _ = backproject_depth(depth, intrinsics, extrinsics)
    assert points.dtype == torch.float32
    torch.testing.assert_close(points, reference, atol=1e-6, rtol=0)


def _prefix_cache_dtypes(policy, batch, noise) -> tuple[set, torch.Tensor]:
    """(dtypes of the prefix KV cache built while `policy` predicts a chunk on `batch`, the actions)."""
    fusion = policy.model.fusion
    build_cache = fusion.forward_prefix
    dtypes = set()

    def recording(*args, **kwargs):
        cache = build_cache(*args, **kwargs)
        dtypes.update(t.dtype for t in (*cache.keys, *cache.values))
        return cache

    fusion.forward_prefix = recording
    try:
        actions = policy.predict_action_chunk(batch, noise=noise)
    finally:
        del fusion.forward_prefix
    return dtypes, actions


def test_a_bf16_checkpoint_loaded_to_act_holds_weights_and_kv_cache_in_bf16(tmp_path):
    """lerobot-eval / lerobot-rollout / the policy server: from_pretrained, then chunks; no float32 copy."""
    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

    trained = bf16_policy()
    trained.train()  # a training run: float32 master weights, in its evaluation passes too
    trained.save_pretrained(tmp_path)
    batch = preprocess(trained, raw_batch())
    noise = fixed_noise(trained)
    _, master_actions = _prefix_cache_dtypes(trained, batch, noise)
    assert any(p.dtype == torch.float32 for p in trained.parameters())

    served = Llava3DFusionPolicy.from_pretrained(tmp_path)
    cache_dtypes, actions = _prefix_cache_dtypes(served, batch, noise)
    assert {p.dtype for p in served.parameters()} == {torch.bfloat16}
    assert cache_dtypes == {torch.bfloat16}
    assert actions.dtype == torch.float32
    # Within bf16 rounding of the float32-master model's actions (same noise, both compute in bf16).
    error = (actions - master_actions).abs().max().item()
    assert error < 0.05, error

    # Training it again (fine-tuning the loaded policy) restores float32 master weights.
    served.train()
    trainable = {p.dtype for p in served.parameters() if p.requires_grad}
    assert trainable == {torch.float32}
    served.predict_action_chunk(batch, noise=noise)  # its evaluation passes keep them
    assert {p.dtype for p in served.parameters() if p.requires_grad} == {torch.float32}


def test_llava3d_position_mlp_tells_millimetres_apart_under_bf16_autocast():
    """xyz enter LLaVA-3D's position MLP in float32: two points 1 mm apart at 0.8 m (bf16 steps are
    3.9 mm there, so bf16 inputs would be one point) get the embeddings float32 gives them."""
    from lerobot_llava3d_fusion.geometry.llava3d_encoder import Llava3DPositionMLP

    torch.manual_seed(0)
    mlp = Llava3DPositionMLP(32, gated=False)
    first = mlp.position_embedding_head[0]
    with torch.no_grad():  # a first layer that resolves millimetres around 0.8 m, as a trained one may
        first.weight.mul_(1000.0)
        first.bias.copy_(-first.weight @ torch.tensor([0.3, -0.2, 0.8005]))
    points = torch.tensor([[[0.3, -0.2, 0.8], [0.3, -0.2, 0.801]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    reference = mlp(points, valid)
    assert (reference[0, 1] - reference[0, 0]).abs().max() > 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embedding = mlp(points, valid)
    torch.testing.assert_close(embedding.float(), reference, atol=0.02, rtol=0.02)


@pytest.mark.parametrize(
    ("overrides", "trains"),
    [({}, True), ({"train_expert_only": True, "expert_mode": "separate"}, True), ({}, False)],
    ids=["training", "train_expert_only", "served"],
)
def test_bf16_compute_keeps_both_residual_streams_float32(overrides, trains):
    """bf16 matmuls, float32 residual streams: the tokens entering every layer of the VLM (prefix) and
    of the action expert (suffix) are float32, in training (float32 master weights, a frozen bf16
    VLM) and in a policy loaded only to act (bf16 weights)."""
    policy = bf16_policy(**overrides)
    if trains:
        policy.train()
    fusion = policy.model.fusion
    seen = {"prefix": set(), "suffix": set(), "matmul": set()}
    hooks = [
        layer.input_layernorm.register_forward_hook(lambda m, args, out, s=seen[stream]: s.add(args[0].dtype))
        for stream, layers in (("prefix", fusion.vlm_layers), ("suffix", fusion.expert_layers))
        for layer in layers
    ]
    hooks.append(
        fusion.expert_layers[0].mlp.down_proj.register_forward_hook(
            lambda m, args, out: seen["matmul"].add(out.dtype)
        )
    )
    try:
        policy.predict_action_chunk(preprocess(policy, raw_batch()))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"prefix": {torch.float32}, "suffix": {torch.float32}, "matmul": {torch.bfloat16}}


def test_bf16_weights_stored_under_inference_mode_are_ordinary_tensors():
    """lerobot-eval acts under torch.inference_mode(): the bf16 weights stored at the first chunk must
    not be inference tensors, which autograd refuses afterwards (a loss computed with gradients)."""
    policy = bf16_policy()
    batch = preprocess(policy, raw_batch())
    with torch.inference_mode():
        policy.select_action(batch)
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    assert not any(p.is_inference() for p in policy.parameters())
    loss, _ = policy.forward(batch)
    loss.backward()
