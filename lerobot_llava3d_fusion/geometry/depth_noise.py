"""Sensor-like depth: what an active stereo RGB-D camera (Intel RealSense D400) makes of exact depth.

The model, applied to exact metric z-depth (0 = invalid, kept invalid):

1. Axial noise: Gaussian with the D400 series' RMS depth error (Intel's D400 tuning guide,
   Grunnet-Jepsen et al., "Best-Known-Methods for Tuning Intel RealSense D400 Depth Cameras")
   ``sigma(z) = z**2 * subpixel / (focal_px * baseline)``: the disparity error of the stereo
   matcher (``subpixel``, in pixels) turned into depth, growing with distance squared. Defaults: the
   D435 (50 mm baseline, 87 degree horizontal depth field of view at 848 x 480, so
   ``focal_px = 424 / tan(43.5 deg) = 447``) and Intel's typical subpixel accuracy of 0.08 px:
   3.6 mm at 1 m.
2. Holes at depth edges: stereo matching fails in the occlusion shadow next to an edge, on the side
   of the farther surface. A pixel whose depth exceeds one of its 4-neighbours' by more than
   `edge_jump` is invalidated with probability `edge_invalid_probability`.
3. Holes at random (dark, shiny or texture-less spots): each pixel with probability
   `random_invalid_probability`.
4. Quantisation to the sensor's depth unit (1 mm, the D400's default depth scale).

Works on numpy arrays (with a ``np.random.Generator``) and torch tensors (with a ``torch.Generator``,
or None for torch's global one) of shape (..., H, W): (H, W), (1, H, W) or (B, 1, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEPTH_NOISE_KINDS = ("none", "sensor")


@dataclass(frozen=True)
class SensorDepthNoise:
    """Parameters of the sensor depth model (see the module doc for their sources)."""

    baseline: float = 0.050  # stereo baseline (m), D435
    focal_px: float = 424 / math.tan(math.radians(87 / 2))  # depth focal length (px), D435 at 848 x 480
    subpixel: float = 0.08  # stereo matching RMS disparity error (px), Intel's typical value
    depth_unit: float = 0.001  # quantisation step (m), the D400's default depth scale
    edge_jump: float = 0.01  # a 4-neighbour nearer by more than this (m) puts a pixel in an edge shadow
    edge_invalid_probability: float = 0.5  # share of edge-shadow pixels lost
    random_invalid_probability: float = 0.01  # share of all other pixels lost

    def __post_init__(self):
        for name in ("baseline", "focal_px", "subpixel", "depth_unit", "edge_jump"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SensorDepthNoise.{name} must be positive, got {getattr(self, name)}")
        for name in ("edge_invalid_probability", "random_invalid_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SensorDepthNoise.{name} must be in [0, 1], got {getattr(self, name)}")

    def sigma(self, depth):
        """RMS axial error (m) at z-depth `depth` (m)."""
        return depth**2 * self.subpixel / (self.focal_px * self.baseline)


def check_depth_noise(kind: str) -> None:
    """Raises a ValueError naming the choices for an unknown depth-noise kind."""
    if kind not in DEPTH_NOISE_KINDS:
        raise ValueError(f"depth_noise must be one of {DEPTH_NOISE_KINDS}, got {kind!r}")


def edge_shadow(depth: torch.Tensor, edge_jump: float) -> torch.Tensor:
    """(..., H, W) bool: pixels farther than one of their 4-neighbours by more than `edge_jump`."""
    image = depth.reshape(-1, 1, *depth.shape[-2:])
    # Neighbours outside the image repeat the border pixel, so they make no jump.
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    height, width = image.shape[-2:]
    neighbours = torch.stack(
        [
            padded[..., 0:height, 1 : width + 1],
            padded[..., 2 : height + 2, 1 : width + 1],
            padded[..., 1 : height + 1, 0:width],
            padded[..., 1 : height + 1, 2 : width + 2],
        ]
    )
    valid_neighbours = neighbours > 0
    shadow = ((image - neighbours > edge_jump) & valid_neighbours).any(dim=0)
    return shadow.reshape(depth.shape)


def sensor_depth_noise(depth, generator=None, noise: SensorDepthNoise = SensorDepthNoise()):
    """Exact z-depth -> what the modelled sensor would report (see the module doc).

    Args:
        depth: (..., H, W) metres, 0 where invalid; a numpy array or a torch tensor.
        generator: ``np.random.Generator`` for a numpy `depth` (required), ``torch.Generator`` or
            None for a tensor.
        noise: the model's parameters.

    Returns:
        The noisy depth, same type, shape and dtype as `depth`; 0 where invalid.
    """
    if isinstance(depth, np.ndarray):
        if not isinstance(generator, np.random.Generator):
            raise TypeError(f"a numpy depth map needs a np.random.Generator, got {type(generator).__name__}")
        torch_generator = torch.Generator().manual_seed(int(generator.integers(2**63)))
        exact = torch.from_numpy(np.asarray(depth, dtype=np.float64))
        noisy = sensor_depth_noise(exact, torch_generator, noise)
        return noisy.numpy().astype(depth.dtype)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"a depth tensor needs a torch.Generator or None, got {type(generator).__name__}")

    exact = depth.double()
    # Random draws on the CPU from the generator (same numbers on every device), then moved.
    gaussian = torch.randn(exact.shape, generator=generator, dtype=torch.float64).to(exact.device)
    uniform_edge = torch.rand(exact.shape, generator=generator, dtype=torch.float64).to(exact.device)
    uniform_random = torch.rand(exact.shape, generator=generator, dtype=torch.float64).to(exact.device)

    noisy = exact + noise.sigma(exact) * gaussian
    noisy = torch.round(noisy / noise.depth_unit) * noise.depth_unit
    invalid = (exact <= 0) | (noisy <= 0)
    invalid |= edge_shadow(exact, noise.edge_jump) & (uniform_edge < noise.edge_invalid_probability)
    invalid |= uniform_random < noise.random_invalid_probability
    return noisy.masked_fill(invalid, 0.0).to(depth.dtype)
