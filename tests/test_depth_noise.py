"""The sensor depth model: its statistics match the model it cites."""

import numpy as np
import pytest
import torch

from lerobot_llava3d_fusion.geometry.depth_noise import (
    SensorDepthNoise,
    check_depth_noise,
    edge_shadow,
    sensor_depth_noise,
)

NO_HOLES = SensorDepthNoise(edge_invalid_probability=0.0, random_invalid_probability=0.0)


def test_noise_std_grows_with_distance_squared_as_the_d400_model():
    distances = np.array([0.4, 0.7, 1.0, 1.5, 2.0])
    planes = torch.from_numpy(np.repeat(distances, 200 * 200).reshape(len(distances), 1, 200, 200))
    noisy = sensor_depth_noise(planes, torch.Generator().manual_seed(0), NO_HOLES)
    error = (noisy - planes).numpy().reshape(len(distances), -1)
    measured = error.std(axis=1)
    # Quantisation adds a uniform error of variance unit^2 / 12 to the Gaussian one.
    expected = np.sqrt(NO_HOLES.sigma(distances) ** 2 + NO_HOLES.depth_unit**2 / 12)
    np.testing.assert_allclose(measured, expected, rtol=0.03)
    np.testing.assert_allclose(error.mean(axis=1), 0.0, atol=2e-4)  # unbiased
    # A least-squares fit of log std against log distance has the model's exponent, 2 (far range,
    # where quantisation is negligible).
    slope = np.polyfit(np.log(distances[2:]), np.log(measured[2:]), 1)[0]
    assert slope == pytest.approx(2.0, abs=0.05)
    # D435 at 1 m: about 3.6 mm RMS (Intel's formula with its typical parameters).
    assert SensorDepthNoise().sigma(1.0) == pytest.approx(0.0036, abs=0.0001)


def test_depth_is_quantised_to_the_sensor_unit():
    depth = torch.full((1, 1, 64, 64), 0.8123456)
    noisy = sensor_depth_noise(depth, torch.Generator().manual_seed(1)).double()
    steps = noisy[noisy > 0] / 0.001
    torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
    assert len(torch.unique(steps.round())) > 5  # noise spreads values over several steps


def test_random_holes_have_the_requested_frequency_and_invalid_input_stays_invalid():
    noise = SensorDepthNoise(random_invalid_probability=0.05)
    depth = np.full((300, 300), 1.0, dtype=np.float32)
    depth[:10] = 0.0  # already invalid
    noisy = sensor_depth_noise(depth, np.random.default_rng(0), noise)
    assert noisy.dtype == np.float32 and noisy.shape == depth.shape
    assert (noisy[:10] == 0).all()
    assert (noisy[10:] == 0).mean() == pytest.approx(0.05, abs=0.005)


def test_holes_at_depth_edges_fall_on_the_far_side_with_the_requested_probability():
    # A 20 cm high step: the near half (0.8 m) next to the far half (1.0 m) along a vertical edge.
    depth = torch.full((400, 64), 1.0, dtype=torch.float64)
    depth[:, :32] = 0.8
    shadow = edge_shadow(depth, edge_jump=0.01)
    expected = torch.zeros_like(shadow)
    expected[:, 32] = True  # the far pixels next to the near ones, not the near pixels
    assert torch.equal(shadow, expected)

    noise = SensorDepthNoise(edge_invalid_probability=0.3, random_invalid_probability=0.0)
    noisy = sensor_depth_noise(depth, torch.Generator().manual_seed(2), noise)
    assert (noisy[:, 32] == 0).double().mean().item() == pytest.approx(0.3, abs=0.05)
    assert (noisy[:, :32] > 0).all() and (noisy[:, 33:] > 0).all()
    # A slope of 5 mm per pixel (a tilted surface) makes no edge.
    ramp = 1.0 + torch.arange(64, dtype=torch.float64) * 0.005
    assert not edge_shadow(ramp.expand(400, 64), 0.01).any()


def test_seeded_and_shape_preserving_for_every_supported_layout():
    for shape in [(32, 32), (1, 32, 32), (3, 1, 32, 32)]:
        depth = torch.full(shape, 0.9)
        first = sensor_depth_noise(depth, torch.Generator().manual_seed(5))
        second = sensor_depth_noise(depth, torch.Generator().manual_seed(5))
        assert first.shape == depth.shape and first.dtype == depth.dtype
        assert torch.equal(first, second)
    with pytest.raises(TypeError, match="np.random.Generator"):
        sensor_depth_noise(np.ones((8, 8)), torch.Generator())


def test_bad_parameters_and_kinds_name_the_field():
    with pytest.raises(ValueError, match="baseline"):
        SensorDepthNoise(baseline=0.0)
    with pytest.raises(ValueError, match="edge_invalid_probability"):
        SensorDepthNoise(edge_invalid_probability=1.5)
    with pytest.raises(ValueError, match="depth_noise"):
        check_depth_noise("kinect")
