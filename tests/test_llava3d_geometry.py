"""LLaVA-3D's 3D patches: nearest patch points, the position MLP and voxel pooling, as functions."""

import pytest
import torch

from lerobot_llava3d_fusion.geometry.llava3d_encoder import (
    Llava3DGeometryEncoder,
    Llava3DPositionMLP,
    voxel_pool,
)
from lerobot_llava3d_fusion.geometry.patch_points import backproject_depth, points_to_patches

INTRINSICS = torch.tensor([[10.0, 0.0, 5.5], [0.0, 8.0, 3.5], [0.0, 0.0, 1.0]])


def test_nearest_patch_points_take_one_pixel_per_patch_like_a_nearest_resize():
    depth = 1.0 + torch.rand(2, 1, 8, 12)  # 8 x 12 pixels -> 2 x 3 patches of 4 x 4 pixels
    depth[1, 0, 4, 8] = 0.0  # the pixel patch (1, 2) of sample 1 takes: missing depth
    points, valid = backproject_depth(depth, INTRINSICS)
    patch_points, patch_valid = points_to_patches(points, valid, (2, 3), "nearest")
    expected = points[:, ::4, ::4].reshape(2, 6, 3)  # pixel (4 i, 4 j) for patch (i, j)
    assert torch.equal(patch_points, expected)
    assert patch_valid.sum() == 11 and not patch_valid[1, 5]
    mean_points, _ = points_to_patches(points, valid, (2, 3), "mean")
    assert not torch.allclose(mean_points, patch_points)
    with pytest.raises(ValueError, match="patch point method"):
        points_to_patches(points, valid, (2, 3), "median")


def test_position_encoder_is_the_original_mlp_gated_or_not():
    torch.manual_seed(0)
    points = torch.randn(2, 5, 3)
    valid = torch.tensor([[True] * 5, [True, True, False, True, True]])
    plain = Llava3DPositionMLP(16, gated=False)
    head = plain.position_embedding_head
    assert [type(m).__name__ for m in head] == ["Linear", "LayerNorm", "ReLU", "Linear"]
    expected = head[3](torch.relu(head[1](head[0](points))))
    output = plain(points, valid)
    torch.testing.assert_close(output[0], expected[0])
    assert torch.equal(output[1, 2], torch.zeros(16)) and torch.equal(output[1, 3], expected[1, 3])
    assert plain.gate is None

    gated = Llava3DPositionMLP(16, gated=True)
    assert torch.equal(gated(points, valid), torch.zeros(2, 5, 16))  # gate starts at 0
    gated(points, valid).sum().backward()
    assert gated.gate.grad.abs().sum() > 0
    assert torch.equal(Llava3DPositionMLP(16, gated=True, gate_init=1.0).gate, torch.ones(16))


def test_voxel_pool_averages_patches_sharing_a_voxel():
    # Sample 0: patches 0 and 2 share a voxel, patch 1 has its own, patch 3 has no point.
    # Sample 1: all four patches in one voxel.
    features = torch.arange(2 * 4 * 2, dtype=torch.float).view(2, 4, 2)
    points = torch.tensor(
        [
            [[0.01, 0.0, 1.0], [0.5, 0.0, 1.0], [-0.02, 0.03, 1.04], [0.0, 0.0, 0.0]],
            [[0.3, 0.3, 0.3]] * 4,
        ]
    )
    valid = torch.tensor([[True, True, True, False], [True] * 4])
    voxels = voxel_pool(features, points, valid, voxel_size=0.1)
    assert voxels.features.shape == (2, 3, 2)
    assert voxels.mask.tolist() == [[True, True, True], [True, False, False]]
    # Sample 0, in voxel order (x first): the shared voxel at x=0, the x=0.5 voxel, then the depth-less patch.
    torch.testing.assert_close(
        voxels.features[0],
        torch.stack([(features[0, 0] + features[0, 2]) / 2, features[0, 1], features[0, 3]]),
    )
    torch.testing.assert_close(voxels.points[0, 0], (points[0, 0] + points[0, 2]) / 2)
    assert voxels.valid.tolist() == [[True, True, False], [True, False, False]]
    torch.testing.assert_close(voxels.features[1, 0], features[1].mean(0))
    assert torch.equal(voxels.features[1, 1:], torch.zeros(2, 2))  # padding


def test_voxel_pool_keeps_one_token_per_patch_when_every_patch_has_its_own_voxel():
    torch.manual_seed(0)
    features = torch.randn(1, 6, 4, requires_grad=True)
    points = torch.tensor(
        [
            [
                [0.0, 0.0, 1.0],
                [0.3, 0.0, 1.0],
                [0.0, 0.3, 1.0],
                [0.3, 0.3, 1.0],
                [0.0, 0.0, 1.3],
                [0.6, 0.0, 1.0],
            ]
        ]
    )
    voxels = voxel_pool(features, points, torch.ones(1, 6, dtype=torch.bool), voxel_size=0.1)
    assert voxels.mask.all() and voxels.features.shape == (1, 6, 4)
    # The same tokens, in voxel order (x, then y, then z).
    order = [0, 4, 2, 1, 3, 5]
    assert torch.equal(voxels.features[0], features[0, order].detach())
    assert torch.equal(voxels.points[0], points[0, order])
    voxels.features.sum().backward()
    assert torch.equal(features.grad, torch.ones_like(features))
    with pytest.raises(ValueError, match="voxel_size"):
        voxel_pool(features, points, torch.ones(1, 6, dtype=torch.bool), voxel_size=0.0)


def test_llava3d_patch_encoder_gives_known_world_points_for_a_known_pose():
    patches = Llava3DGeometryEncoder(8, (2, 3), gated=False)
    plane = torch.ones(1, 1, 8, 12)  # 1 m everywhere
    pose = torch.eye(4)
    pose[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    camera_points, valid = patches.patch_points_of(plane, INTRINSICS)
    world_points, _ = patches.patch_points_of(plane, INTRINSICS, pose)
    assert patches.patch_point_method == "nearest" and valid.all()
    # Patch (i, j) takes pixel (u, v) = (4 j, 4 i): x = (u - 5.5) / 10, y = (v - 3.5) / 8 at z = 1 m.
    expected = torch.tensor(
        [[(4 * j - 5.5) / 10.0, (4 * i - 3.5) / 8.0, 1.0] for i in range(2) for j in range(3)]
    )
    torch.testing.assert_close(camera_points[0], expected)
    torch.testing.assert_close(world_points[0], expected + pose[:3, 3])
    torch.testing.assert_close(
        patches(plane, INTRINSICS, pose), patches.position_mlp(world_points, torch.ones(1, 6, dtype=torch.bool))
    )
