"""The 3D part: each geometry source's depth reaches the model as the right 3D points, starts neutral,
and fails clearly."""

import pytest
import torch
from helpers import CAMERAS, fixed_noise, preprocess, raw_batch, tiny_config
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.processor import PolicyProcessorPipeline
from lerobot.utils.feature_utils import dataset_to_policy_features

from lerobot_llava3d_fusion import make_llava3d_fusion_pre_post_processors
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy
from lerobot_llava3d_fusion.observation_keys import GEOMETRY_ORIGIN

DEPTH_SIZE = 24
INTRINSICS = [[20.0, 0.0, 11.5], [0.0, 20.0, 11.5], [0.0, 0.0, 1.0]]


def geometry_features(cameras=CAMERAS):
    features = {key: PolicyFeature(FeatureType.VISUAL, (3, 40, 40)) for key in CAMERAS}
    features["observation.state"] = PolicyFeature(FeatureType.STATE, (5,))
    for key in cameras:
        name = key.removeprefix("observation.images.")
        features[f"observation.depth.{name}"] = PolicyFeature(FeatureType.STATE, (1, DEPTH_SIZE, DEPTH_SIZE))
    return features


def geometry_policy(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(
        geometry="depth",
        input_features=geometry_features(),
        camera_intrinsics={"top": INTRINSICS, "wrist": INTRINSICS},
    )
    fields.update(overrides)
    return Llava3DFusionPolicy(tiny_config(**fields))


def with_depth(batch, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    batch = dict(batch)
    for key in CAMERAS:
        name = key.removeprefix("observation.images.")
        batch[f"observation.depth.{name}"] = (
            0.5 + torch.rand(2, 1, DEPTH_SIZE, DEPTH_SIZE, generator=generator)
        ) * scale
    return batch


def test_geometry_starts_neutral_and_is_used_once_the_gate_opens():
    plain = Llava3DFusionPolicy(tiny_config())
    policy = geometry_policy()
    missing, unexpected = policy.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("model.geometry_encoder.") for k in missing)
    batch = preprocess(plain, with_depth(raw_batch()))
    noise = fixed_noise(policy, seed=3)
    reference = plain.predict_action_chunk(batch, noise=noise)
    # Gate at zero: switching geometry on leaves the pretrained model's actions unchanged.
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=noise), reference, atol=1e-6, rtol=0)
    with torch.no_grad():
        policy.model.geometry_encoder.position_mlp.gate.fill_(1.0)
    opened = policy.predict_action_chunk(batch, noise=noise)
    assert not torch.allclose(opened, reference, atol=1e-4)
    # ... and the actions now depend on the depth values.
    moved = policy.predict_action_chunk(preprocess(plain, with_depth(raw_batch(), scale=2.0)), noise=noise)
    assert not torch.allclose(moved, opened, atol=1e-4)


def test_geometry_gate_init_opens_the_gate_from_the_start():
    opened = geometry_policy(seed=0, geometry_gate_init=1.0)
    assert torch.equal(
        opened.model.geometry_encoder.position_mlp.gate, torch.ones_like(opened.model.geometry_encoder.position_mlp.gate)
    )
    # The same weights with the gate set by hand give the same actions: the option only sets the gate.
    by_hand = geometry_policy(seed=0)
    with torch.no_grad():
        by_hand.model.geometry_encoder.position_mlp.gate.fill_(1.0)
    batch = preprocess(opened, with_depth(raw_batch()))
    noise = fixed_noise(opened, seed=3)
    torch.testing.assert_close(
        opened.predict_action_chunk(batch, noise=noise), by_hand.predict_action_chunk(batch, noise=noise)
    )
    with pytest.raises(ValueError, match="geometry_gate_init"):
        tiny_config(geometry_gate_init=float("nan"))


@pytest.mark.parametrize("encoder", ["sinusoidal", "llava3d_mlp"])
@pytest.mark.parametrize("target", ["prefix", "expert"])
def test_geometry_policy_trains_and_cached_sampling_matches(target, encoder):
    policy = geometry_policy(geometry_target=target, geometry_encoder=encoder)
    batch = preprocess(policy, with_depth(raw_batch()))
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert policy.model.geometry_encoder.position_mlp.gate.grad is not None
    noise = fixed_noise(policy, seed=3)
    cached = policy.predict_action_chunk(batch, noise=noise)
    policy.config.use_cache = False
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=noise), cached, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", ["prefix", "expert"])
def test_several_points_per_patch_train_and_reach_the_actions(target):
    fields = dict(geometry_target=target, geometry_gate_init=1.0, geometry_patch_points="nearest")
    policy = geometry_policy(**fields, geometry_samples_per_patch_side=3)
    first_layer = policy.model.geometry_encoder.position_mlp.mlp[0]
    assert first_layer.in_features == 9 * 6 * policy.model.geometry_encoder.position_mlp.num_frequencies
    batch = preprocess(policy, with_depth(raw_batch()))
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss) and first_layer.weight.grad.abs().sum() > 0
    noise = fixed_noise(policy, seed=3)
    cached = policy.predict_action_chunk(batch, noise=noise)
    policy.config.use_cache = False
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=noise), cached, atol=1e-5, rtol=0)
    policy.config.use_cache = True
    # Depth pixel (2, 2) is no patch's top-left pixel (the 4 x 4 grid samples every 6th of 24) but a
    # sample of the 3 x 3 cells (every 2nd): it changes these actions and not those of one point per patch.
    moved = with_depth(raw_batch())
    moved["observation.depth.top"] = moved["observation.depth.top"].clone()
    moved["observation.depth.top"][:, :, 2, 2] += 0.3
    assert not torch.allclose(policy.predict_action_chunk(preprocess(policy, moved), noise=noise), cached)
    one_point = geometry_policy(**fields)
    torch.testing.assert_close(
        one_point.predict_action_chunk(preprocess(one_point, moved), noise=noise),
        one_point.predict_action_chunk(batch, noise=noise),
    )


def test_only_cameras_with_depth_get_geometry_and_intrinsics_can_come_from_the_batch():
    features = geometry_features(cameras=CAMERAS[:1])
    policy = geometry_policy(input_features=features, camera_intrinsics={}, geometry_gate_init=1.0)
    assert policy.config.geometry_camera_keys == [CAMERAS[0]]
    batch = preprocess(policy, with_depth(raw_batch()))
    with pytest.raises(KeyError, match="intrinsics"):
        policy.predict_action_chunk(batch)
    batch["observation.intrinsics.top"] = torch.tensor(INTRINSICS).expand(2, 3, 3)
    top, wrist = policy._prepare_inputs(batch).camera_geometry
    assert wrist is None and torch.equal(top.depth, batch["observation.depth.top"])
    # The same weights with the intrinsics in the config instead give the same actions.
    from_config = geometry_policy(
        input_features=features, camera_intrinsics={"top": INTRINSICS}, geometry_gate_init=1.0
    )
    without_intrinsics = {k: v for k, v in batch.items() if k != "observation.intrinsics.top"}
    noise = fixed_noise(policy, seed=3)
    torch.testing.assert_close(
        policy.predict_action_chunk(batch, noise=noise),
        from_config.predict_action_chunk(without_intrinsics, noise=noise),
        atol=0,
        rtol=0,
    )


def test_dataset_depth_features_are_wired_and_never_normalized():
    dataset_features = {
        "observation.images.top": {
            "dtype": "image",
            "shape": (40, 40, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.depth.top": {"dtype": "float32", "shape": (1, DEPTH_SIZE, DEPTH_SIZE), "names": None},
        "observation.intrinsics.top": {"dtype": "float32", "shape": (3, 3), "names": None},
        "observation.state": {"dtype": "float32", "shape": (5,), "names": None},
        "action": {"dtype": "float32", "shape": (3,), "names": None},
    }
    features = dataset_to_policy_features(dataset_features)
    config = tiny_config(
        geometry="depth",
        input_features={k: v for k, v in features.items() if k != "action"},
        output_features={"action": features["action"]},
    )
    assert config.geometry_camera_keys == ["observation.images.top"]
    stats = {
        key: {"mean": torch.full(ft.shape, 3.0), "std": torch.full(ft.shape, 2.0)}
        for key, ft in features.items()
        if ft.type is not FeatureType.VISUAL
    }
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(config, dataset_stats=stats)
    depth = torch.rand(1, 1, DEPTH_SIZE, DEPTH_SIZE) + 0.5
    state = torch.randn(1, 5)
    out = preprocessor(
        {
            "observation.images.top": torch.rand(1, 3, 40, 40),
            "observation.depth.top": depth,
            "observation.intrinsics.top": torch.tensor([INTRINSICS]),
            "observation.state": state,
            "action": torch.zeros(1, 3),
            "task": ["touch the red block"],
        }
    )
    assert torch.equal(out["observation.depth.top"], depth)  # metric depth untouched
    torch.testing.assert_close(out["observation.state"], (state - 3.0) / 2.0)  # state normalized


def test_camera_matrices_pass_unchanged_through_a_reloaded_preprocessor_with_lerobot_train_overrides(
    tmp_path,
):
    """What `lerobot-train --policy.path=<checkpoint>` (fine-tuning) and `--resume` do to the saved
    preprocessor: every input feature and the per-type normalization_mapping replace the normalizer's."""
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import batch_to_transition, transition_to_batch

    features = {
        "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 40, 40)),
        "observation.depth.top": PolicyFeature(FeatureType.VISUAL, (1, DEPTH_SIZE, DEPTH_SIZE)),
        "observation.intrinsics.top": PolicyFeature(FeatureType.STATE, (3, 3)),
        "observation.extrinsics.top": PolicyFeature(FeatureType.STATE, (4, 4)),
        "observation.state": PolicyFeature(FeatureType.STATE, (5,)),
    }
    config = tiny_config(geometry="depth", input_features=features)
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(config, dataset_stats=None)
    preprocessor.save_pretrained(tmp_path)

    # A new dataset's per-element stats: the focal length is constant, so its std is 0.
    intrinsics = torch.tensor([INTRINSICS])
    extrinsics = torch.eye(4)[None].clone()
    extrinsics[0, :3, 3] = torch.tensor([0.1, -0.2, 1.5])
    stats = {
        "observation.intrinsics.top": {"mean": intrinsics[0], "std": torch.zeros(3, 3)},
        "observation.extrinsics.top": {"mean": extrinsics[0], "std": torch.zeros(4, 4)},
        "observation.depth.top": {"mean": torch.full((1, 1, 1), 800.0), "std": torch.full((1, 1, 1), 50.0)},
        "observation.state": {"mean": torch.full((5,), 3.0), "std": torch.full((5,), 2.0)},
        "action": {"mean": torch.zeros(3), "std": torch.ones(3)},
    }
    overrides = {
        "normalizer_processor": {
            "features": {**config.input_features, **config.output_features},
            "norm_map": config.normalization_mapping,
            "stats": stats,
        },
    }
    reloaded = PolicyProcessorPipeline.from_pretrained(
        tmp_path,
        "policy_preprocessor.json",
        overrides=overrides,
        to_transition=batch_to_transition,
        to_output=transition_to_batch,
    )
    depth = torch.rand(1, 1, DEPTH_SIZE, DEPTH_SIZE) + 0.5
    state = torch.randn(1, 5)
    out = reloaded(
        {
            "observation.images.top": torch.rand(1, 3, 40, 40),
            "observation.depth.top": depth,
            "observation.intrinsics.top": intrinsics,
            "observation.extrinsics.top": extrinsics,
            "observation.state": state,
            "action": torch.zeros(1, 3),
            "task": ["touch the red block"],
        }
    )
    assert torch.equal(out["observation.intrinsics.top"], intrinsics)
    assert torch.equal(out["observation.extrinsics.top"], extrinsics)
    assert torch.equal(out["observation.depth.top"], depth)
    torch.testing.assert_close(out["observation.state"], (state - 3.0) / 2.0)  # the new stats apply


def test_normalised_camera_matrices_are_refused():
    policy = geometry_policy()
    batch = preprocess(policy, with_depth(raw_batch()))
    normalised = dict(batch)
    normalised["observation.intrinsics.top"] = torch.zeros(2, 3, 3)  # MEAN_STD of a constant matrix
    with pytest.raises(ValueError, match="observation.intrinsics.top is not a pinhole matrix.*normalised"):
        policy.predict_action_chunk(normalised)
    mirrored = dict(batch)  # a horizontally mirrored image (LIBERO's): fx < 0 is a real camera
    flipped = torch.tensor(INTRINSICS) * torch.tensor([[-1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mirrored["observation.intrinsics.top"] = flipped.expand(2, 3, 3)
    assert torch.isfinite(policy.predict_action_chunk(mirrored)).all()
    normalised = dict(batch)
    normalised["observation.extrinsics.top"] = torch.eye(4).expand(2, 4, 4) * 0.5
    with pytest.raises(ValueError, match="observation.extrinsics.top is not a rigid"):
        policy.predict_action_chunk(normalised)
    rotated = dict(batch)  # a real camera pose passes
    pose = torch.eye(4)
    pose[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    pose[:3, 3] = torch.tensor([0.3, 0.0, 1.2])
    rotated["observation.extrinsics.top"] = pose.expand(2, 4, 4)
    assert torch.isfinite(policy.predict_action_chunk(rotated)).all()


def test_depth_at_another_resolution_than_its_intrinsics_is_refused():
    policy = geometry_policy()
    batch = preprocess(policy, with_depth(raw_batch()))
    # Config intrinsics describe the 24x24 depth the policy was built for; this depth is 12x12.
    smaller = dict(batch)
    smaller["observation.depth.top"] = batch["observation.depth.top"][..., ::2, ::2]
    with pytest.raises(ValueError, match=r"observation.depth.top is 12x12.*24x24"):
        policy.predict_action_chunk(smaller)
    # Per-frame intrinsics for another grid: the principal point falls outside the depth image.
    wrong = dict(smaller)
    wrong["observation.intrinsics.top"] = torch.tensor([INTRINSICS]).expand(2, 3, 3) * torch.tensor(
        [[2.0], [2.0], [1.0]]
    )
    with pytest.raises(ValueError, match=r"observation.depth.top is 12x12.*principal point"):
        policy.predict_action_chunk(wrong)
    # Per-frame intrinsics that describe the 12x12 grid are fine.
    scaled = dict(smaller)
    scaled["observation.intrinsics.top"] = torch.tensor([INTRINSICS]).expand(2, 3, 3) * torch.tensor(
        [[0.5], [0.5], [1.0]]
    )
    assert torch.isfinite(policy.predict_action_chunk(scaled)).all()


def test_geometry_without_depth_features_is_rejected():
    with pytest.raises(ValueError, match="geometry='depth'"):
        tiny_config(geometry="depth").validate_features()
    with pytest.raises(ValueError, match="depth_estimator_name"):
        tiny_config(geometry="estimator")


def test_nan_depth_and_bad_matrices_raise():
    policy = geometry_policy()
    batch = preprocess(policy, with_depth(raw_batch()))
    bad = dict(batch)
    bad["observation.depth.top"] = batch["observation.depth.top"].clone()
    bad["observation.depth.top"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action_chunk(bad)
    # Millimetres (LeRobot's default depth unit when loading a dataset) are not silently ignored.
    bad = dict(batch)
    bad["observation.depth.top"] = batch["observation.depth.top"] * 1000.0
    with pytest.raises(ValueError, match="depth_output_unit=m"):
        policy.predict_action_chunk(bad)
    bad = dict(batch)
    bad["observation.intrinsics.top"] = torch.eye(4).expand(2, 4, 4)
    with pytest.raises(ValueError, match="3x3"):
        policy.predict_action_chunk(bad)
    del batch["observation.depth.wrist"]
    with pytest.raises(KeyError, match="observation.depth.wrist"):
        policy.predict_action_chunk(batch)


def test_invalid_depth_gives_finite_actions_and_gradients():
    policy = geometry_policy(allow_missing_depth=True)  # a camera without any usable depth is accepted
    with torch.no_grad():
        policy.model.geometry_encoder.position_mlp.gate.fill_(1.0)
    batch = preprocess(policy, with_depth(raw_batch()))
    batch["observation.depth.top"] = torch.zeros_like(batch["observation.depth.top"])  # all invalid
    batch["observation.depth.wrist"][:, :, :5] = float("inf")
    # A camera without any valid depth keeps exactly its 2D patch tokens.
    prefix, _, _ = prefix_of(policy, batch)
    top_tokens = policy.model.embed_images(policy._prepare_inputs(batch).images[:1])[0]
    torch.testing.assert_close(prefix[:, : top_tokens.shape[1]], top_tokens, atol=0, rtol=0)
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    assert torch.isfinite(policy.predict_action_chunk(batch)).all()


def tiny_depth_estimator(directory):
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=28,
        patch_size=14,
        reshape_hidden_states=False,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8,
        head_hidden_size=8,
        depth_estimation_type="metric",
        max_depth=5,
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(directory)
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False).save_pretrained(directory)


def test_estimated_depth_gives_the_3d_points_of_that_depth_recorded(tmp_path):
    tiny_depth_estimator(tmp_path)
    torch.manual_seed(0)
    policy = Llava3DFusionPolicy(
        tiny_config(
            geometry="estimator",
            depth_estimator_name=str(tmp_path),
            camera_intrinsics={"top": INTRINSICS, "wrist": INTRINSICS},
            geometry_gate_init=1.0,
        )
    )
    batch = preprocess(policy, raw_batch())  # no depth in the batch
    assert policy.config.geometry_camera_keys == list(CAMERAS)
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)
    estimator = policy.model.depth_estimator
    assert not any(p.requires_grad for p in estimator.parameters())
    depth, intrinsics = estimator(batch[CAMERAS[0]], torch.tensor([INTRINSICS] * 2))
    assert depth.shape == (2, 1, 28, 28) and (depth > 0).all()
    # 40 px image -> 28 px depth grid, pixel centres kept: fx' = fx * 28/40, cx' = (cx + 0.5) * 28/40 - 0.5.
    assert intrinsics[0, 0, 0].item() == pytest.approx(20.0 * 28 / 40)
    assert intrinsics[0, 0, 2].item() == pytest.approx(12.0 * 28 / 40 - 0.5)

    # The same weights with the estimator's depth recorded in the batch give the same prefix and actions.
    estimated_depth_features = {
        f"observation.depth.{name}": PolicyFeature(FeatureType.STATE, (1, 28, 28))
        for name in ("top", "wrist")
    }
    recorded = geometry_policy(
        input_features={**geometry_features(), **estimated_depth_features}, geometry_gate_init=1.0
    )
    _, unexpected = recorded.load_state_dict(policy.state_dict(), strict=False)
    assert unexpected and all(key.startswith("model.depth_estimator.") for key in unexpected)
    recorded_batch = dict(batch)
    for key in CAMERAS:
        name = key.removeprefix("observation.images.")
        depth, intrinsics = estimator(batch[key], torch.tensor([INTRINSICS] * 2))
        recorded_batch[f"observation.depth.{name}"] = depth
        recorded_batch[f"observation.intrinsics.{name}"] = intrinsics
    torch.testing.assert_close(prefix_of(recorded, recorded_batch)[0], prefix_of(policy, batch)[0])
    noise = fixed_noise(policy, seed=3)
    torch.testing.assert_close(
        recorded.predict_action_chunk(recorded_batch, noise=noise),
        policy.predict_action_chunk(batch, noise=noise),
    )


# ------------------------------------------------------------------------ LLaVA-3D encoder, voxels

GRID = 4  # the tiny tower's 32 px images in 8 px patches
TOWER_WIDTH = 32


def test_llava3d_mlp_encoder_on_the_tiny_backbone_is_gated_on_the_tower_width():
    policy = geometry_policy(geometry_encoder="llava3d_mlp")
    geometry = policy.model.geometry_encoder
    assert geometry.grid_size == (GRID, GRID) and geometry.patch_point_method == "nearest"
    assert geometry.position_mlp.position_embedding_head[0].weight.shape == (TOWER_WIDTH, 3)
    assert torch.equal(geometry.position_mlp.gate, torch.zeros(TOWER_WIDTH))
    assert (
        geometry_policy(
            geometry_encoder="llava3d_mlp", geometry_patch_points="mean"
        ).model.geometry_encoder.patch_point_method
        == "mean"
    )
    assert geometry_policy().model.geometry_encoder.patch_point_method == "mean"  # sinusoidal default


def test_none_source_gives_the_prefix_of_no_geometry_input():
    plain = Llava3DFusionPolicy(tiny_config())  # geometry="none"
    assert plain.config.geometry_camera_keys == [] and plain.model.geometry_encoder is None
    batch = preprocess(plain, with_depth(raw_batch()))  # depth in the batch is not read
    inputs = plain._prepare_inputs(batch)
    assert inputs.camera_geometry == [None, None]
    prefix, mask, expert_tokens = prefix_of(plain, batch)
    # [projected patch tokens of each camera][task tokens], every image token valid.
    model = plain.model
    expected = torch.cat([*model.embed_images(inputs.images), model.embed_tokens(inputs.lang_tokens)], dim=1)
    torch.testing.assert_close(prefix, expected, atol=0, rtol=0)
    images = 2 * GRID**2
    assert mask[:, :images].all() and torch.equal(mask[:, images:], inputs.lang_mask)
    assert expert_tokens is None
    # A depth policy with the same weights and its gate open, given no 3D input, builds the same prefix.
    depth = geometry_policy(geometry_gate_init=1.0)
    depth.load_state_dict(plain.state_dict(), strict=False)
    depth_prefix, _, _ = depth.model.embed_prefix(
        inputs.images, [None, None], inputs.lang_tokens, inputs.lang_mask
    )
    torch.testing.assert_close(depth_prefix, prefix, atol=0, rtol=0)


def plane_batch(policy, depths, extrinsics=None):
    """A preprocessed batch whose cameras see `depths[cam]` (B, 1, 24, 24) and optional poses."""
    batch = dict(raw_batch())
    for key in CAMERAS:
        name = key.removeprefix("observation.images.")
        batch[f"observation.depth.{name}"] = depths[name]
        if extrinsics is not None:
            batch[f"observation.extrinsics.{name}"] = extrinsics[name].expand(2, 4, 4)
    return preprocess(policy, batch)


def translation(x):
    pose = torch.eye(4)
    pose[0, 3] = x
    return pose


def prefix_of(policy, batch):
    inputs = policy._prepare_inputs(batch)
    return policy.model.embed_prefix(
        inputs.images, inputs.camera_geometry, inputs.lang_tokens, inputs.lang_mask
    )


def assert_same_tokens_in_some_order(tokens, expected):
    """(N, D) tokens equal (N, D) expected up to a permutation of the rows."""
    assert tokens.shape == expected.shape
    match = torch.cdist(tokens, expected).argmin(dim=1)
    assert sorted(match.tolist()) == list(range(expected.shape[0]))
    torch.testing.assert_close(tokens, expected[match], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["llava3d_mlp", "sinusoidal"])
def test_voxel_pooling_merges_two_cameras_looking_at_the_same_plane(encoder):
    policy = geometry_policy(geometry_encoder=encoder, geometry_voxel_size=0.1, geometry_gate_init=1.0)
    plane = torch.ones(2, 1, DEPTH_SIZE, DEPTH_SIZE)  # 1 m: patch points 0.3 m apart
    batch = plane_batch(policy, {"top": plane, "wrist": plane})
    prefix, mask, _ = prefix_of(policy, batch)
    text_length = batch["observation.language.tokens"].shape[1]
    # Both cameras' 16 patches land in the same 16 voxels: 16 image tokens instead of 32.
    assert prefix.shape[1] == GRID**2 + text_length and mask[:, : GRID**2].all()
    model = policy.model
    inputs = policy._prepare_inputs(batch)
    features = model.image_features(inputs.images)
    points, valid = model.geometry_encoder.patch_points_of(plane, torch.tensor(INTRINSICS))
    mean = (features[0] + features[1]) / 2
    if encoder == "llava3d_mlp":  # projector(mean over the voxel of (tower features + MLP(xyz)))
        expected = model.image_encoder.projector(mean + model.geometry_encoder.position_mlp(points, valid))
    else:  # projector(mean tower features) + gated sinusoidal encoding of the mean point
        expected = model.image_encoder.projector(mean) + model.geometry_encoder.position_mlp(points, valid)
    for sample in range(2):
        assert_same_tokens_in_some_order(prefix[sample, : GRID**2], expected[sample])

    # The wrist camera moved by one patch spacing along x: 3 of its 4 patch columns overlap the top's.
    shifted = plane_batch(
        policy, {"top": plane, "wrist": plane}, {"top": torch.eye(4), "wrist": translation(0.3)}
    )
    prefix, mask, _ = prefix_of(policy, shifted)
    assert prefix.shape[1] == GRID**2 + GRID + text_length and mask[:, : GRID**2 + GRID].all()


def test_voxel_pooling_leaves_a_scene_with_one_voxel_per_patch_unchanged():
    pooled = geometry_policy(geometry_encoder="llava3d_mlp", geometry_voxel_size=0.1, geometry_gate_init=1.0)
    plain = geometry_policy(geometry_encoder="llava3d_mlp", geometry_gate_init=1.0)
    plain.load_state_dict(pooled.state_dict())
    plane = torch.ones(2, 1, DEPTH_SIZE, DEPTH_SIZE)
    far_apart = {"top": torch.eye(4), "wrist": translation(10.0)}
    batch = plane_batch(pooled, {"top": plane, "wrist": plane}, far_apart)
    pooled_prefix, pooled_mask, _ = prefix_of(pooled, batch)
    plain_prefix, plain_mask, _ = prefix_of(plain, batch)
    assert pooled_prefix.shape == plain_prefix.shape and torch.equal(pooled_mask, plain_mask)
    images = 2 * GRID**2
    for sample in range(2):  # the same 32 image tokens (in voxel order), the same text tokens
        assert_same_tokens_in_some_order(pooled_prefix[sample, :images], plain_prefix[sample, :images])
    assert torch.equal(pooled_prefix[:, images:], plain_prefix[:, images:])


def test_voxel_pooling_pads_samples_with_different_token_counts():
    policy = geometry_policy(geometry_encoder="llava3d_mlp", geometry_voxel_size=0.1, geometry_gate_init=1.0)
    generator = torch.Generator().manual_seed(4)
    depths = {
        name: 0.5 + torch.rand(2, 1, DEPTH_SIZE, DEPTH_SIZE, generator=generator) for name in ("top", "wrist")
    }
    for name in depths:  # sample 0: both cameras see the same plane (16 tokens); sample 1: rough scenes
        depths[name][0] = 1.0
    batch = plane_batch(policy, depths)
    _, mask, _ = prefix_of(policy, batch)
    image_tokens = mask.shape[1] - batch["observation.language.tokens"].shape[1]
    counts = mask[:, :image_tokens].sum(dim=1).tolist()
    assert counts[0] == GRID**2 and counts[1] == image_tokens > counts[0]
    assert not mask[0, counts[0] : image_tokens].any()  # padding, hidden by the mask

    noise = fixed_noise(policy, seed=3)
    cached = policy.predict_action_chunk(batch, noise=noise)
    policy.config.use_cache = False
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise=noise), cached, atol=1e-5, rtol=0)
    policy.config.use_cache = True
    # The padded sample's actions are those it gets alone (no padding).
    alone = {key: value[:1] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    torch.testing.assert_close(
        policy.predict_action_chunk(alone, noise=noise[:1]), cached[:1], atol=1e-5, rtol=0
    )

    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)
    head_grad = policy.model.geometry_encoder.position_mlp.position_embedding_head[0].weight.grad
    assert head_grad is not None and torch.isfinite(head_grad).all() and head_grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"geometry_voxel_size": 0.0}, "geometry_voxel_size must be a positive number"),
        ({"geometry_voxel_size": float("nan")}, "geometry_voxel_size must be a positive number"),
        ({"geometry_voxel_size": 0.2, "geometry": "none"}, "geometry_voxel_size needs 3D points"),
        (
            {"geometry_voxel_size": 0.2, "geometry_target": "expert"},
            "geometry_voxel_size .* geometry_target='prefix'",
        ),
        ({"geometry_voxel_size": 0.2, "image_pooling": 2}, "geometry_voxel_size replaces image_pooling"),
        ({"geometry_encoder": "mlp"}, "geometry_encoder must be one of"),
        ({"geometry_patch_points": "center"}, "geometry_patch_points must be one of"),
        ({"geometry_samples_per_patch_side": 0}, "geometry_samples_per_patch_side must be a positive int"),
        ({"geometry_samples_per_patch_side": 2.0}, "geometry_samples_per_patch_side must be a positive int"),
        (
            {"geometry_samples_per_patch_side": 2, "geometry_encoder": "llava3d_mlp"},
            "needs geometry_encoder='sinusoidal'",
        ),
        (
            {"geometry_samples_per_patch_side": 2, "geometry_voxel_size": 0.2},
            "cannot be combined with geometry_voxel_size",
        ),
        ({"geometry_origin": "camera"}, "geometry_origin must be one of"),
        ({"geometry_origin": "state", "geometry_origin_state_indices": (0, 1)}, "3 distinct non-negative"),
        ({"geometry_origin": "state", "geometry_origin_state_indices": (0, 0, 1)}, "3 distinct non-negative"),
        (
            {"geometry_origin": "state", "geometry_origin_state_indices": (0, -1, 2)},
            "3 distinct non-negative",
        ),
        ({"geometry_origin": "state", "geometry": "none"}, "geometry='none' makes none"),
    ],
)
def test_bad_3d_patch_options_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{"geometry": "depth", **overrides})


STATE_STATS = {
    "observation.state": {"mean": torch.full((5,), 0.3), "std": torch.full((5,), 2.0)},
    "action": {"mean": torch.zeros(3), "std": torch.ones(3)},
}


def shifted_scene(shift, origin_indices=(3, 0, 1)):
    """The raw batch of `with_depth` seen by cameras translated by `shift` metres along world x, with the
    state position (`origin_indices` of the state: x, y, z) moved by the same amount."""
    batch = with_depth(raw_batch())
    for key in CAMERAS:
        name = key.removeprefix("observation.images.")
        batch[f"observation.extrinsics.{name}"] = translation(shift).expand(2, 4, 4)
    state = batch["observation.state"].clone()
    state[:, origin_indices[0]] += shift
    batch["observation.state"] = state
    return batch


def test_geometry_origin_state_measures_points_from_the_raw_state_position(tmp_path):
    policy = geometry_policy(
        geometry_gate_init=1.0, geometry_origin="state", geometry_origin_state_indices=(3, 0, 1)
    )
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(policy.config, dataset_stats=STATE_STATS)
    raw = shifted_scene(0.0)
    batch = preprocessor(raw)
    # The origin is the raw state position (in the order x, y, z of the indices), the state normalized.
    torch.testing.assert_close(batch[GEOMETRY_ORIGIN], raw["observation.state"][:, [3, 0, 1]])
    torch.testing.assert_close(batch["observation.state"], (raw["observation.state"] - 0.3) / 2.0)
    # Moving cameras and state position together leaves the 3D-aware prefix unchanged ...
    prefix, _, _ = prefix_of(policy, batch)
    moved, _, _ = prefix_of(policy, preprocessor(shifted_scene(0.25)))
    torch.testing.assert_close(moved, prefix, atol=1e-5, rtol=1e-5)
    # ... whereas with world coordinates the same move changes it.
    world = geometry_policy(geometry_gate_init=1.0)
    world.load_state_dict(policy.state_dict())
    world_preprocessor, _ = make_llava3d_fusion_pre_post_processors(world.config, dataset_stats=STATE_STATS)
    world_prefix, _, _ = prefix_of(world, world_preprocessor(shifted_scene(0.0)))
    world_moved, _, _ = prefix_of(world, world_preprocessor(shifted_scene(0.25)))
    assert not torch.allclose(world_moved, world_prefix, atol=1e-3)
    # The step survives a save and reload of the pipeline (what a checkpoint carries).
    preprocessor.save_pretrained(tmp_path)
    reloaded = PolicyProcessorPipeline.from_pretrained(tmp_path, config_filename="policy_preprocessor.json")
    torch.testing.assert_close(reloaded(shifted_scene(0.0))[GEOMETRY_ORIGIN], batch[GEOMETRY_ORIGIN])
    # The model trains from it.
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_geometry_origin_state_fails_clearly_without_its_input():
    policy = geometry_policy(geometry_origin="state")
    batch = preprocess(policy, with_depth(raw_batch()))
    del batch[GEOMETRY_ORIGIN]
    with pytest.raises(KeyError, match="geometry_origin='state' needs"):
        policy.predict_action_chunk(batch)
    with pytest.raises(ValueError, match="need a state of at least 8 dims"):
        geometry_policy(geometry_origin="state", geometry_origin_state_indices=(0, 1, 7))
