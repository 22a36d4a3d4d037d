"""Camera-pose perturbations for robustness evaluations, shared by the envs.

A perturbation of sizes (t, r) moves a camera by a shift drawn uniformly in [-t, t] metres along
each world axis and turns it by angles drawn uniformly in [-r, r] degrees about each of its own axes
(x, then y, then z, each about the axis as already turned). t = r = 0 leaves the camera where it is.
"""

from __future__ import annotations

import numpy as np

MAX_ROTATION_PERTURBATION = 30.0  # degrees; beyond it a camera may look past its scene


def check_camera_perturbation(translation: float, rotation: float, max_translation: float) -> None:
    """Raises a ValueError naming the option that is out of range."""
    if not 0 <= translation < max_translation:
        raise ValueError(
            f"camera_translation_perturbation must be in [0, {max_translation:.2f}) m, got {translation}"
        )
    if not 0 <= rotation <= MAX_ROTATION_PERTURBATION:
        raise ValueError(
            f"camera_rotation_perturbation must be in [0, {MAX_ROTATION_PERTURBATION:g}] degrees (the camera "
            f"keeps looking at its scene), got {rotation}"
        )


def draw_camera_perturbation(
    rng: np.random.Generator, max_translation: float, max_rotation_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """A random perturbation: shift (3,) in world axes (m) and turn (3, 3) in the camera's own axes,
    applied as ``rotation @ turn`` to a camera-to-world rotation and ``position + shift``."""
    shift = rng.uniform(-max_translation, max_translation, size=3)
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    turn = np.eye(3)
    for axis, angle in enumerate(angles):
        turn = turn @ axis_rotation(axis, angle)
    return shift, turn


def axis_rotation(axis: int, angle: float) -> np.ndarray:
    """(3, 3) rotation by `angle` radians about coordinate axis `axis` (0 = x, 1 = y, 2 = z)."""
    i, j = [k for k in range(3) if k != axis]
    rotation = np.eye(3)
    rotation[i, i] = rotation[j, j] = np.cos(angle)
    rotation[i, j], rotation[j, i] = -np.sin(angle), np.sin(angle)
    return rotation
