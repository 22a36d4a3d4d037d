"""The random-crop augmentation moves RGB, depth and intrinsics together: 3D stays under its pixel."""

import dataclasses

import pytest
import torch
from helpers import fixed_noise, preprocess, raw_batch
from test_policy_geometry import geometry_policy, with_depth

from lerobot_llava3d_fusion.geometry.patch_points import backproject_depth
from lerobot_llava3d_fusion.model.augmentation import crop_and_resize, crop_intrinsics, random_crop_inputs


def test_cropped_depth_and_intrinsics_back_project_to_the_points_under_the_cropped_rgb():
    rgb_size, depth_size, scale = 40, 20, 0.7
    # RGB whose channels hold each pixel's own (column, row): after the crop they tell where a pixel came from.
    rows, cols = torch.meshgrid(torch.arange(rgb_size), torch.arange(rgb_size), indexing="ij")
    rgb = torch.stack([cols, rows, torch.zeros_like(cols)]).float()[None].repeat(2, 1, 1, 1)
    distance = 1.3  # a fronto-parallel plane: every pixel's 3D point is exact at any sub-pixel position
    depth = torch.full((2, 1, depth_size, depth_size), distance)
    intrinsics = torch.tensor([[[18.0, 0.0, 9.5], [0.0, 17.0, 9.0], [0.0, 0.0, 1.0]]]).repeat(2, 1, 1)
    offsets = torch.tensor([[0.2, -0.25], [-0.3, 0.1]])

    cropped_rgb = crop_and_resize(rgb, scale, offsets, mode="bilinear")
    cropped_depth = crop_and_resize(depth, scale, offsets, mode="nearest")
    cropped_intrinsics = crop_intrinsics(intrinsics, scale, offsets, depth_size, depth_size)
    points, valid = backproject_depth(cropped_depth, cropped_intrinsics)
    assert valid.all()

    # The RGB pixel at the centre of depth pixel (u, v) is at 2u + 0.5 (two RGB pixels per depth pixel):
    # bilinear between RGB pixels 2u and 2u + 1. It shows source RGB column c, i.e. depth column (c - 0.5) / 2.
    inner = slice(2, depth_size - 2)
    source_rgb = 0.5 * (cropped_rgb[..., 0::2, 0::2] + cropped_rgb[..., 1::2, 1::2])  # (B, 3, 20, 20)
    source_u = (source_rgb[:, 0] - 0.5) / 2
    source_v = (source_rgb[:, 1] - 0.5) / 2
    fx, cx = intrinsics[:, 0, 0, None, None], intrinsics[:, 0, 2, None, None]
    fy, cy = intrinsics[:, 1, 1, None, None], intrinsics[:, 1, 2, None, None]
    expected_x = (source_u - cx) * distance / fx
    expected_y = (source_v - cy) * distance / fy
    torch.testing.assert_close(points[:, inner, inner, 0], expected_x[:, inner, inner], atol=1e-4, rtol=0)
    torch.testing.assert_close(points[:, inner, inner, 1], expected_y[:, inner, inner], atol=1e-4, rtol=0)
    # A real crop: the points span less of the plane than the uncropped ones.
    full, _ = backproject_depth(depth, intrinsics)
    span = lambda p: p[..., 0].amax(dim=(1, 2)) - p[..., 0].amin(dim=(1, 2))  # noqa: E731
    torch.testing.assert_close(span(points), span(full) * scale, atol=0.02, rtol=0)


def test_nearest_crop_invents_no_depth_between_surfaces():
    depth = torch.zeros(1, 1, 8, 8)
    depth[..., :, 4:] = 2.0  # missing depth (0) next to a surface at 2 m
    cropped = crop_and_resize(depth, 0.75, torch.tensor([[0.1, 0.0]]), mode="nearest")
    assert set(cropped.unique().tolist()) <= {0.0, 2.0}


def test_training_crops_randomly_and_inference_never_crops():
    policy = geometry_policy(augment_crop_scale=0.8)
    batch = preprocess(policy, with_depth(raw_batch()))
    noise, time = fixed_noise(policy, seed=3), torch.tensor([0.3, 0.6])
    policy.train()
    losses = [policy.forward(batch, noise=noise, time=time)[0].item() for _ in range(3)]
    assert len(set(losses)) == 3  # a new crop each step
    reference = geometry_policy(augment_crop_scale=1.0)
    reference.load_state_dict(policy.state_dict())
    torch.testing.assert_close(
        policy.predict_action_chunk(batch, noise=noise),
        reference.predict_action_chunk(batch, noise=noise),
        atol=0,
        rtol=0,
    )


def _depth_reaching_the_model(policy, batch):
    """The depth maps (one per camera) that `policy.forward` hands to its network."""
    seen = []
    network_forward = policy.model.forward

    def recording_forward(inputs, *args, **kwargs):
        seen.extend(camera.depth.clone() for camera in inputs.camera_geometry if camera is not None)
        return network_forward(inputs, *args, **kwargs)

    policy.model.forward = recording_forward
    try:
        policy.forward(batch, noise=fixed_noise(policy, seed=3), time=torch.tensor([0.3, 0.6]))
    finally:
        del policy.model.forward
    return seen


def test_sensor_depth_noise_augments_training_batches_only_when_enabled():
    batch = preprocess(geometry_policy(), with_depth(raw_batch()))
    exact = _depth_reaching_the_model(geometry_policy().train(), batch)
    assert len(exact) == 2

    augmented = geometry_policy(augment_depth_noise=True)
    noisy = _depth_reaching_the_model(augmented.train(), batch)
    for clean, sensor in zip(exact, noisy, strict=True):
        valid = sensor > 0
        assert 0.5 < valid.float().mean() < 1.0  # holes, the rest kept
        steps = sensor[valid].double() / 0.001
        torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)  # millimetre steps
        assert 0 < (sensor - clean)[valid].abs().max() < 0.03  # noise of a few millimetres
    # Evaluation (and lerobot-eval's inference) sees the depth as recorded.
    for clean, seen in zip(exact, _depth_reaching_the_model(augmented.eval(), batch), strict=True):
        torch.testing.assert_close(seen, clean, atol=0, rtol=0)


def test_depth_noise_augmentation_needs_recorded_depth():
    with pytest.raises(ValueError, match="augment_depth_noise"):
        geometry_policy(geometry="none", augment_depth_noise=True)


def test_the_crop_keeps_the_geometry_origin_and_points_stay_relative_to_it():
    policy = geometry_policy(
        augment_crop_scale=0.8, geometry_origin="state", geometry_origin_state_indices=(3, 0, 1)
    ).train()
    inputs = policy._prepare_inputs(preprocess(policy, with_depth(raw_batch())))
    origin = inputs.camera_geometry[0].origin
    assert origin is not None and origin.abs().sum() > 0
    cropped = random_crop_inputs(inputs, policy.config.augment_crop_scale)
    for image, camera in zip(cropped.images, cropped.camera_geometry, strict=True):
        assert camera.origin is origin  # training measures from the end-effector, as inference does
        points, valid = policy.model.camera_patch_points(image, camera)
        world, _ = policy.model.camera_patch_points(image, dataclasses.replace(camera, origin=None))
        assert valid.any()
        torch.testing.assert_close(points[valid], (world - origin[:, None])[valid])
