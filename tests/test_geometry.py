"""Tests for lerobot_llava3d_fusion.geometry.patch_points (depth -> per-patch 3D points and their encoding)."""

import math

import pytest
import torch

from lerobot_llava3d_fusion.geometry.patch_points import (
    SinusoidalGeometryEncoder,
    SinusoidalPositionMLP,
    backproject_depth,
    points_to_patch_samples,
    points_to_patches,
    pool_points_to_patches,
    sinusoidal_3d_encoding,
)

# A non-square image with fx != fy and cx != cy, so swapped rows/columns or swapped focal lengths show up.
HEIGHT, WIDTH = 6, 8
FX, FY, CX, CY = 100.0, 80.0, 4.0, 3.0


def make_intrinsics(fx=FX, fy=FY, cx=CX, cy=CY, skew=0.0):
    return torch.tensor([[fx, skew, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def plane_depth(batch_size=1, z=2.0, height=HEIGHT, width=WIDTH):
    return torch.full((batch_size, 1, height, width), z)


def rigid_transform(rotation, translation):
    transform = torch.eye(4)
    transform[:3, :3] = torch.as_tensor(rotation, dtype=torch.float32)
    transform[:3, 3] = torch.as_tensor(translation, dtype=torch.float32)
    return transform


# ------------------------------------------------------------------------------------------ backproject_depth


def test_backproject_fronto_parallel_plane_matches_pinhole_model():
    points, valid = backproject_depth(plane_depth(z=2.0), make_intrinsics())

    assert points.shape == (1, HEIGHT, WIDTH, 3)
    assert points.dtype == torch.float32
    assert valid.shape == (1, HEIGHT, WIDTH) and valid.all()
    assert torch.all(points[..., 2] == 2.0)
    # (row v, column u) -> x = (u - cx) z / fx, y = (v - cy) z / fy, pixel centres at integer indices.
    for v, u in [(0, 0), (0, 7), (5, 0), (3, 4), (5, 7), (1, 6)]:
        expected = torch.tensor([(u - CX) * 2.0 / FX, (v - CY) * 2.0 / FY, 2.0])
        torch.testing.assert_close(points[0, v, u], expected, rtol=1e-6, atol=1e-7)
    # The principal point back-projects onto the optical axis.
    assert torch.all(points[0, int(CY), int(CX), :2] == 0.0)


def test_backproject_accepts_3d_depth_and_batched_intrinsics():
    depth = torch.stack([torch.full((HEIGHT, WIDTH), 1.0), torch.full((HEIGHT, WIDTH), 3.0)])  # (B, H, W)
    intrinsics = torch.stack([make_intrinsics(), make_intrinsics(fx=50.0, cx=2.0)])

    points, _ = backproject_depth(depth, intrinsics)

    torch.testing.assert_close(points[0, 0, 0], torch.tensor([-4.0 / 100.0, -3.0 / 80.0, 1.0]))
    torch.testing.assert_close(points[1, 0, 0], torch.tensor([-2.0 * 3.0 / 50.0, -3.0 * 3.0 / 80.0, 3.0]))


def test_backproject_reprojects_to_pixel_grid_with_skew():
    intrinsics = make_intrinsics(skew=5.0)
    depth = torch.rand(1, 1, HEIGHT, WIDTH) * 3.0 + 0.5

    points, valid = backproject_depth(depth, intrinsics)

    assert valid.all()
    projected = points[0] @ intrinsics.T  # (H, W, 3) homogeneous pixel coordinates times z
    pixels = projected[..., :2] / projected[..., 2:]
    rows, cols = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    torch.testing.assert_close(pixels, torch.stack([cols, rows], dim=-1).float(), rtol=0, atol=1e-4)


def test_backproject_float64_depth_stays_float64():
    points, _ = backproject_depth(plane_depth().double(), make_intrinsics())
    assert points.dtype == torch.float64


def test_extrinsics_pure_translation_shifts_every_valid_point():
    depth = plane_depth()
    depth[0, 0, 0, 0] = 0.0  # one invalid pixel must stay at the origin, not be translated
    translation = torch.tensor([1.0, -2.0, 0.5])

    camera_points, valid = backproject_depth(depth, make_intrinsics())
    world_points, world_valid = backproject_depth(
        depth, make_intrinsics(), rigid_transform(torch.eye(3), translation)
    )

    assert torch.equal(valid, world_valid)
    torch.testing.assert_close(world_points[valid], camera_points[valid] + translation)
    assert torch.all(world_points[0, 0, 0] == 0.0)


def test_extrinsics_90_degree_rotation_is_applied_per_batch_element():
    rot_z_90 = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # (x, y, z) -> (-y, x, z)
    extrinsics = torch.stack(
        [rigid_transform(rot_z_90, [0.0, 0.0, 0.0]), rigid_transform(rot_z_90, [0.0, 0.0, 1.0])]
    )
    depth = plane_depth(batch_size=2)

    camera_points, _ = backproject_depth(depth, make_intrinsics())
    world_points, _ = backproject_depth(depth, make_intrinsics(), extrinsics)

    x, y, z = camera_points.unbind(-1)
    torch.testing.assert_close(world_points[0], torch.stack([-y[0], x[0], z[0]], dim=-1))
    torch.testing.assert_close(world_points[1], torch.stack([-y[1], x[1], z[1] + 1.0], dim=-1))


def test_backprojected_pixel_lands_on_the_known_world_point():
    # A camera 1 m above the world origin's (0.2, -0.1), looking straight down at a table at z = 0.2 m:
    # camera x = world x, camera y = world -y, camera z (forward) = world -z.
    pose = rigid_transform([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]], [0.2, -0.1, 1.0])

    points, valid = backproject_depth(plane_depth(z=0.8), make_intrinsics(), pose)

    assert valid.all()
    # The principal point (u, v) = (cx, cy) = (4, 3) sees the table straight below the camera.
    torch.testing.assert_close(points[0, 3, 4], torch.tensor([0.2, -0.1, 0.2]))
    # Pixel (u, v) = (6, 1): x_cam = (6 - 4) * 0.8 / 100 = 0.016, y_cam = (1 - 3) * 0.8 / 80 = -0.02.
    torch.testing.assert_close(points[0, 1, 6], torch.tensor([0.216, -0.08, 0.2]))
    # Every pixel lies on the table.
    torch.testing.assert_close(points[..., 2], torch.full((1, HEIGHT, WIDTH), 0.2))


def test_invalid_depths_are_masked_and_zeroed():
    depth = plane_depth()
    bad_values = [0.0, -1.0, float("nan"), float("inf"), float("-inf"), 150.0, 1e-4]
    for column, value in enumerate(bad_values):
        depth[0, 0, 0, column] = value
    depth[0, 0, 1, 0] = 100.0  # max_depth itself is still valid

    points, valid = backproject_depth(
        depth, make_intrinsics(), rigid_transform(torch.eye(3), [1.0, 1.0, 1.0])
    )

    assert torch.isfinite(points).all()
    assert not valid[0, 0, : len(bad_values)].any()
    assert valid[0, 0, len(bad_values) :].all() and valid[0, 1:].all()
    assert torch.all(points[0, 0, : len(bad_values)] == 0.0)
    assert points[0, 1, 0, 2] == 101.0


# ------------------------------------------------------------------------------------- pool_points_to_patches


def test_pool_returns_row_major_patch_means():
    depth = plane_depth(height=8, width=8)
    points, valid = backproject_depth(depth, make_intrinsics(fx=10.0, fy=10.0, cx=0.0, cy=0.0))

    patch_points, patch_valid = pool_points_to_patches(points, valid, (2, 4))  # 4x2-pixel patches

    assert patch_points.shape == (1, 8, 3) and patch_valid.shape == (1, 8) and patch_valid.all()
    # Patch (row 1, col 2) is flat index 1 * 4 + 2 = 6 and covers rows 4..7, columns 4..5.
    torch.testing.assert_close(patch_points[0, 6], points[0, 4:8, 4:6].reshape(-1, 3).mean(0))
    torch.testing.assert_close(patch_points[0, 1], points[0, 0:4, 2:4].reshape(-1, 3).mean(0))


def test_single_pixel_change_only_moves_its_own_patch():
    depth = torch.rand(2, 1, 8, 8) + 1.0
    intrinsics = make_intrinsics()
    before, _ = pool_points_to_patches(*backproject_depth(depth, intrinsics), (4, 4))

    changed = depth.clone()
    changed[1, 0, 5, 2] += 0.7  # row 5 -> patch row 2, column 2 -> patch column 1 -> flat patch 2 * 4 + 1 = 9
    after, _ = pool_points_to_patches(*backproject_depth(changed, intrinsics), (4, 4))

    differs = (before != after).any(-1)
    expected = torch.zeros_like(differs)
    expected[1, 9] = True
    assert torch.equal(differs, expected)


def test_pool_ignores_invalid_pixels_and_marks_empty_patches():
    depth = torch.rand(1, 1, 4, 4) + 1.0
    depth[0, 0, 0:2, 0:2] = float("nan")  # patch 0: fully invalid
    depth[0, 0, 0, 2] = 0.0  # patch 1: one hole ...
    depth[0, 0, 1, 3] = float("inf")  # ... and one inf among four pixels
    points, valid = backproject_depth(depth, make_intrinsics())

    patch_points, patch_valid = pool_points_to_patches(points, valid, (2, 2))

    assert torch.isfinite(patch_points).all()
    assert patch_valid.tolist() == [[False, True, True, True]]
    assert torch.all(patch_points[0, 0] == 0.0)
    expected_mixed = torch.stack([points[0, 0, 3], points[0, 1, 2]]).mean(0)
    torch.testing.assert_close(patch_points[0, 1], expected_mixed)


def test_pool_ignores_whatever_invalid_points_hold():
    points = torch.ones(1, 2, 2, 3)
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    points[0, 0, 0] = float("nan")
    points[0, 1, 1] = 1e30
    valid[0, 0, 0] = valid[0, 1, 1] = False

    patch_points, patch_valid = pool_points_to_patches(points, valid, (1, 1))

    assert patch_valid.all()
    assert torch.equal(patch_points, torch.ones(1, 1, 3))


def test_pool_handles_sizes_not_divisible_by_grid():
    depth = torch.full((1, 1, 7, 10), 2.0)
    points, valid = backproject_depth(depth, make_intrinsics())

    patch_points, patch_valid = pool_points_to_patches(points, valid, (3, 4))

    assert patch_points.shape == (1, 12, 3) and patch_valid.all()
    torch.testing.assert_close(patch_points[..., 2], torch.full((1, 12), 2.0))
    # x grows along a patch row, y grows down the patch columns.
    assert (patch_points[0].view(3, 4, 3)[:, 1:, 0] > patch_points[0].view(3, 4, 3)[:, :-1, 0]).all()
    assert (patch_points[0].view(3, 4, 3)[1:, :, 1] > patch_points[0].view(3, 4, 3)[:-1, :, 1]).all()


@pytest.mark.parametrize(
    ("method", "expected_top_right"),
    [
        # Rows 0-1, columns 4-7 of a 4 x 8 image: mean pixel (u, v) = (5.5, 0.5).
        ("mean", [(5.5 - CX) * 2.0 / FX, (0.5 - CY) * 2.0 / FY, 2.0]),
        # A nearest resize to the 2 x 2 grid takes the cell's top-left pixel (u, v) = (4, 0).
        ("nearest", [(4.0 - CX) * 2.0 / FX, (0.0 - CY) * 2.0 / FY, 2.0]),
    ],
)
def test_known_depth_gives_the_known_patch_point(method, expected_top_right):
    patches = SinusoidalGeometryEncoder(hidden_size=8, grid_size=(2, 2), patch_point_method=method)
    translation = torch.tensor([0.5, -0.25, 1.0])

    points, valid = patches.patch_points_of(plane_depth(z=2.0, height=4, width=8), make_intrinsics())
    moved, _ = patches.patch_points_of(
        plane_depth(z=2.0, height=4, width=8), make_intrinsics(), rigid_transform(torch.eye(3), translation)
    )

    assert points.shape == (1, 4, 3) and valid.all()
    torch.testing.assert_close(points[0, 1], torch.tensor(expected_top_right))  # patch (row 0, column 1)
    torch.testing.assert_close(moved[0, 1], torch.tensor(expected_top_right) + translation)


# ------------------------------------------------------------------------------------ points_to_patch_samples


@pytest.mark.parametrize("method", ["nearest", "mean"])
def test_patch_samples_are_the_cells_of_each_patch_in_row_major_order(method):
    points = torch.randn(2, 8, 12, 3)  # 8 x 12 pixels, a 2 x 3 grid of 4 x 4-pixel patches
    valid = torch.rand(2, 8, 12) > 0.2

    samples, samples_valid = points_to_patch_samples(points, valid, (2, 3), method, samples_per_side=2)

    assert samples.shape == (2, 6, 4, 3) and samples_valid.shape == (2, 6, 4)
    # The same method on the 2x finer (4 x 6) grid, its cells grouped by patch.
    fine, fine_valid = points_to_patches(points, valid, (4, 6), method)
    fine, fine_valid = fine.view(2, 4, 6, 3), fine_valid.view(2, 4, 6)
    for patch_row, patch_col in [(0, 0), (0, 2), (1, 1)]:
        patch = patch_row * 3 + patch_col
        for cell, (dr, dc) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            row, col = 2 * patch_row + dr, 2 * patch_col + dc
            assert torch.equal(samples[:, patch, cell], fine[:, row, col])
            assert torch.equal(samples_valid[:, patch, cell], fine_valid[:, row, col])
    # One sample per side is the plain per-patch point.
    single, single_valid = points_to_patch_samples(points, valid, (2, 3), method, samples_per_side=1)
    plain, plain_valid = points_to_patches(points, valid, (2, 3), method)
    assert torch.equal(single[:, :, 0], plain) and torch.equal(single_valid[:, :, 0], plain_valid)


def block_depth(first_column: int, height: int = 8, width: int = 8) -> torch.Tensor:
    """A table at 2 m with a 2-pixel-wide raised block (1.5 m) on columns ``first_column`` and the next."""
    depth = plane_depth(z=2.0, height=height, width=width).clone()
    depth[..., first_column : first_column + 2] = 1.5
    return depth


def test_patch_samples_see_an_edge_inside_a_patch_that_one_point_misses():
    # Patch column 0 holds pixel columns 0-3. The block on columns 2-3 and the one on 3-4 both leave
    # its top-left pixel on the table, so one nearest point per patch gives patch 0 the same point for
    # both; 2 x 2 samples per patch (pixel columns 0 and 2) see the first block and not the second.
    intrinsics = make_intrinsics(cx=3.5, cy=3.5)
    one_point = SinusoidalGeometryEncoder(16, (2, 2), patch_point_method="nearest", gate_init=1.0)
    four_points = SinusoidalGeometryEncoder(
        16, (2, 2), patch_point_method="nearest", gate_init=1.0, samples_per_side=2
    )
    left, right = block_depth(2), block_depth(3)

    torch.testing.assert_close(one_point(left, intrinsics)[:, 0], one_point(right, intrinsics)[:, 0])
    assert not torch.allclose(four_points(left, intrinsics)[:, 0], four_points(right, intrinsics)[:, 0])
    samples, _ = four_points.patch_points_of(left, intrinsics)
    assert samples[0, 0, :, 2].tolist() == [2.0, 1.5, 2.0, 1.5]  # pixel columns 0, 2 of rows 0, 2


def test_patch_samples_encoder_ignores_invalid_samples():
    torch.manual_seed(0)
    encoder = SinusoidalPositionMLP(hidden_size=16, gate_init=1.0, samples_per_patch=4)
    samples = torch.randn(2, 3, 4, 3)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    valid[0, 1, 2] = False  # one invalid sample in a patch
    valid[1, 2] = False  # a patch without any valid sample

    output = encoder(samples, valid)

    assert output.shape == (2, 3, 16)
    changed = samples.clone()
    changed[0, 1, 2] = 100.0  # whatever an invalid sample holds does not matter ...
    changed[1, 2] = -7.0
    torch.testing.assert_close(encoder(changed, valid), output)
    assert torch.all(output[1, 2] == 0.0) and (output[0, 1].abs().sum() > 0)
    changed[0, 1, 1] += 0.05  # ... a valid one does
    assert not torch.allclose(encoder(changed, valid)[0, 1], output[0, 1])


# ------------------------------------------------------------------------------------- sinusoidal_3d_encoding


def test_encoding_shape_bounds_and_origin():
    points = (torch.rand(5, 7, 3) - 0.5) * 200.0  # up to +-100 m

    encoding = sinusoidal_3d_encoding(points, num_frequencies=16, max_wavelength=8.0)

    assert encoding.shape == (5, 7, 96) and encoding.dtype == torch.float32
    assert encoding.min() >= -1.0 and encoding.max() <= 1.0
    origin = sinusoidal_3d_encoding(torch.zeros(3), 4, 8.0).view(3, 8)
    assert torch.all(origin[:, :4] == 0.0) and torch.all(origin[:, 4:] == 1.0)  # sin block, then cos block


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_encoding_distinguishes_points_one_centimetre_apart_on_each_axis(axis):
    base = torch.tensor([0.31, -0.42, 0.87])
    moved = base.clone()
    moved[axis] += 0.01

    difference = (sinusoidal_3d_encoding(moved, 16, 8.0) - sinusoidal_3d_encoding(base, 16, 8.0)).view(3, 32)

    assert difference[axis].abs().max() > 0.1  # a clear change, not float noise
    other_axes = [a for a in range(3) if a != axis]
    assert torch.all(difference[other_axes] == 0.0)  # each coordinate has its own block


def test_encoding_uses_the_documented_wavelengths():
    # Wavelengths are geomspace(0.01, 8, F): x = 8 m is one full period of the longest one (sin 0, cos 1).
    encoding = sinusoidal_3d_encoding(torch.tensor([8.0, 2.0, 0.0025]), 16, 8.0).view(3, 32)
    torch.testing.assert_close(encoding[0, 15], torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(encoding[0, 31], torch.tensor(1.0))
    torch.testing.assert_close(encoding[1, 15], torch.tensor(1.0))  # quarter wavelength: sin = 1
    torch.testing.assert_close(encoding[2, 0], torch.tensor(1.0))  # quarter of the shortest wavelength, 1 cm
    torch.testing.assert_close(encoding[2, 16], torch.tensor(0.0), atol=1e-5, rtol=0)
    wavelengths = torch.linspace(math.log(0.01), math.log(8.0), 16, dtype=torch.float64).exp()
    expected_sin = torch.sin(2 * math.pi * 2.0 / wavelengths).float()
    torch.testing.assert_close(
        encoding[1, :16], expected_sin, atol=1e-3, rtol=0
    )  # float32 angles reach ~800 rad


# ------------------------------------------------------------------------------------- SinusoidalPositionMLP


def random_patches(batch_size=2, num_patches=6):
    patch_points = torch.randn(batch_size, num_patches, 3)
    patch_valid = torch.ones(batch_size, num_patches, dtype=torch.bool)
    patch_valid[0, 1] = False
    patch_valid[1, 4] = False
    return patch_points, patch_valid


def test_encoder_is_exactly_zero_at_init_and_gate_receives_gradient():
    torch.manual_seed(0)
    encoder = SinusoidalPositionMLP(hidden_size=32)
    patch_points, patch_valid = random_patches()

    output = encoder(patch_points, patch_valid)

    assert output.shape == (2, 6, 32)
    assert torch.all(output == 0.0)
    output.sum().backward()
    assert encoder.gate.grad is not None and encoder.gate.grad.abs().sum().item() > 0.0


def test_encoder_output_after_opening_gate_and_zero_on_invalid_patches():
    torch.manual_seed(0)
    encoder = SinusoidalPositionMLP(hidden_size=32)
    patch_points, patch_valid = random_patches()
    with torch.no_grad():
        encoder.gate.fill_(0.5)

    output = encoder(patch_points, patch_valid)

    assert (output[patch_valid].abs().sum(-1) > 0).all()
    assert torch.all(output[~patch_valid] == 0.0)
    # The gate scales the output linearly.
    with torch.no_grad():
        encoder.gate.fill_(1.0)
    torch.testing.assert_close(encoder(patch_points, patch_valid), 2.0 * output)


def test_encoder_output_dtype_follows_parameters():
    encoder = SinusoidalPositionMLP(hidden_size=16).to(torch.bfloat16)
    patch_points, patch_valid = random_patches()

    output = encoder(patch_points, patch_valid)

    assert output.dtype == torch.bfloat16


def test_invalid_depth_gives_finite_features_and_gradients():
    torch.manual_seed(0)
    module = SinusoidalGeometryEncoder(hidden_size=16, grid_size=(2, 2))
    with torch.no_grad():
        module.position_mlp.gate.fill_(1.0)
    depth = torch.rand(1, 1, 4, 4) + 1.0
    depth[0, 0, 0:2, 0:2] = torch.tensor([[0.0, -1.0], [float("nan"), float("inf")]])  # fully invalid patch
    depth[0, 0, 2, 2] = 1e6  # beyond max_depth inside an otherwise valid patch
    depth.requires_grad_(True)

    output = module(depth, make_intrinsics(), rigid_transform(torch.eye(3), [0.1, 0.2, 0.3]))
    output.square().mean().backward()

    assert torch.isfinite(output).all()
    assert torch.all(output[0, 0] == 0.0) and (output[0, 1:].abs().sum(-1) > 0).all()
    assert torch.isfinite(depth.grad).all()
    assert torch.all(depth.grad[0, 0, 0:2, 0:2] == 0.0) and depth.grad[0, 0, 2, 2] == 0.0
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert module.position_mlp.gate.grad.abs().sum().item() > 0.0


def test_sinusoidal_patch_encoder_matches_composed_functions():
    torch.manual_seed(0)
    module = SinusoidalGeometryEncoder(hidden_size=8, grid_size=(3, 4), min_depth=0.5, max_depth=3.0)
    with torch.no_grad():
        module.position_mlp.gate.fill_(1.0)
    depth = torch.rand(2, 1, 12, 16) * 4.0  # some below min_depth, some above max_depth
    intrinsics = make_intrinsics()

    output = module(depth, intrinsics)

    points, valid = backproject_depth(depth, intrinsics, min_depth=0.5, max_depth=3.0)
    expected = module.position_mlp(*pool_points_to_patches(points, valid, (3, 4)))
    assert output.shape == (2, 12, 8)
    assert torch.equal(output, expected)


# ------------------------------------------------------------------------------------------------ bad shapes


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: backproject_depth(torch.ones(1, 2, 4, 4), make_intrinsics()), "depth"),
        (lambda: backproject_depth(torch.ones(4, 4), make_intrinsics()), "depth"),
        (lambda: backproject_depth(torch.ones(1, 4, 4), torch.ones(3, 4)), "intrinsics"),
        (lambda: backproject_depth(torch.ones(2, 4, 4), torch.ones(3, 3, 3)), "intrinsics"),
        (lambda: backproject_depth(torch.ones(1, 4, 4), make_intrinsics(), torch.ones(3, 4)), "extrinsics"),
        (
            lambda: backproject_depth(torch.ones(2, 4, 4), make_intrinsics(), torch.ones(1, 4, 4)),
            "extrinsics",
        ),
        (
            lambda: backproject_depth(torch.ones(1, 4, 4), make_intrinsics(), min_depth=2.0, max_depth=1.0),
            "min_depth",
        ),
        (
            lambda: pool_points_to_patches(
                torch.ones(1, 4, 4, 2), torch.ones(1, 4, 4, dtype=torch.bool), (2, 2)
            ),
            "points",
        ),
        (
            lambda: pool_points_to_patches(
                torch.ones(1, 4, 4, 3), torch.ones(1, 4, 5, dtype=torch.bool), (2, 2)
            ),
            "valid",
        ),
        (
            lambda: pool_points_to_patches(
                torch.ones(1, 4, 4, 3), torch.ones(1, 4, 4, dtype=torch.bool), (0, 2)
            ),
            "grid_size",
        ),
        (lambda: sinusoidal_3d_encoding(torch.ones(4, 2), 4, 8.0), "points"),
        (lambda: sinusoidal_3d_encoding(torch.ones(4, 3), 0, 8.0), "num_frequencies"),
        (lambda: sinusoidal_3d_encoding(torch.ones(4, 3), 4, 0.001), "max_wavelength"),
        (
            lambda: SinusoidalPositionMLP(8)(torch.ones(1, 4, 2), torch.ones(1, 4, dtype=torch.bool)),
            "patch_points",
        ),
        (
            lambda: SinusoidalPositionMLP(8)(torch.ones(1, 4, 3), torch.ones(1, 5, dtype=torch.bool)),
            "patch_valid",
        ),
        (lambda: SinusoidalGeometryEncoder(8, grid_size=(2,)), "grid_size"),
        (
            lambda: SinusoidalPositionMLP(8, samples_per_patch=4)(
                torch.ones(1, 4, 3), torch.ones(1, 4, dtype=torch.bool)
            ),
            "4 samples per patch",
        ),
        (
            lambda: SinusoidalPositionMLP(8, samples_per_patch=4)(
                torch.ones(1, 4, 4, 3), torch.ones(1, 4, dtype=torch.bool)
            ),
            "patch_valid",
        ),
        (lambda: SinusoidalGeometryEncoder(8, grid_size=(2, 2), samples_per_side=0), "samples_per_side"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
