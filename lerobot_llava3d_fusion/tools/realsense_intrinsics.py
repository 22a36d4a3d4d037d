"""Intrinsics of a RealSense depth camera, as ``--policy.camera_intrinsics`` for a ``geometry=depth`` policy.

    llava3d-fusion-realsense-intrinsics --serial <serial> --camera <cam>

connects to the camera, reads its depth stream's intrinsics (adapted to LeRobot's frame rotation) and
prints the flag. :func:`rotated_intrinsics` is the rotation rule on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def rotated_intrinsics(
    intrinsics: list[list[float]], width: int, height: int, rotation: int
) -> list[list[float]]:
    """``K`` of an image rotated as LeRobot's cameras rotate frames (``cv2.rotate``), for the new grid.

    A rotation only relabels pixels: ``K' = A @ K`` with ``A`` the map of old to new pixel coordinates
    (integer pixel centres), so back-projection with ``inv(K')`` stays exact and the camera frame (and
    so any extrinsics) does not change. ``K'`` then mixes rows (a 90 degree rotation swaps the roles
    of fx and fy); use it as a general 3 x 3 matrix.

    Args:
        intrinsics: 3 x 3 ``K`` of the sensor's (unrotated) ``width`` x ``height`` image.
        rotation: LeRobot's ``Cv2Rotation`` value: 0 (none), 90 (``cv2.ROTATE_90_CLOCKWISE``), 180,
            -90 (``cv2.ROTATE_90_COUNTERCLOCKWISE``).
    """
    w, h = width, height
    maps = {
        0: [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        90: [[0, -1, h - 1], [1, 0, 0], [0, 0, 1]],  # cv2.ROTATE_90_CLOCKWISE: (u, v) -> (h-1-v, u)
        180: [[-1, 0, w - 1], [0, -1, h - 1], [0, 0, 1]],  # cv2.ROTATE_180
        -90: [[0, 1, 0], [-1, 0, w - 1], [0, 0, 1]],  # cv2.ROTATE_90_COUNTERCLOCKWISE: (u, v) -> (v, w-1-u)
    }
    if rotation not in maps:
        raise ValueError(f"rotation must be one of {sorted(maps)} (LeRobot's Cv2Rotation), got {rotation}")
    matrix = torch.tensor(maps[rotation], dtype=torch.float64) @ torch.tensor(intrinsics, dtype=torch.float64)
    return matrix.tolist()


def realsense_intrinsics(camera: Any) -> list[list[float]]:
    """``K`` (3 x 3) of the depth frames a connected LeRobot ``RealSenseCamera`` delivers.

    Read from the depth stream's profile (librealsense's ``fx, fy, ppx, ppy``), then adapted to the
    camera's ``rotation``; this is the grid of ``<cam>_depth``. LeRobot does not align depth to colour,
    so these are the depth sensor's intrinsics: 3D points are exact in the depth sensor's frame; their
    assignment to the RGB image's patches assumes the two streams see (nearly) the same view.
    """
    import pyrealsense2 as rs

    profile = camera.rs_profile.get_stream(rs.stream.depth).as_video_stream_profile()
    raw = profile.get_intrinsics()
    matrix = [[raw.fx, 0.0, raw.ppx], [0.0, raw.fy, raw.ppy], [0.0, 0.0, 1.0]]
    # `camera.rotation` is OpenCV's rotate code; the config keeps LeRobot's Cv2Rotation (degrees).
    return rotated_intrinsics(matrix, raw.width, raw.height, int(camera.config.rotation))


def main(argv: list[str] | None = None) -> None:
    """Print ``--policy.camera_intrinsics`` for a RealSense camera (connects to it, reads, disconnects)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--serial", required=True, help="serial number or name of the RealSense camera")
    parser.add_argument("--camera", required=True, help="the camera's name in the robot config (<cam>)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--fps", type=int, default=None)
    parser.add_argument("--rotation", type=int, default=0, choices=(0, 90, 180, -90))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lerobot.cameras.realsense import RealSenseCamera, RealSenseCameraConfig

    config = RealSenseCameraConfig(
        args.serial,
        fps=args.fps,
        width=args.width,
        height=args.height,
        use_depth=True,
        rotation=args.rotation,
    )
    camera = RealSenseCamera(config)
    camera.connect()
    try:
        intrinsics = realsense_intrinsics(camera)
    finally:
        camera.disconnect()
    flag = json.dumps({args.camera: [[round(v, 4) for v in row] for row in intrinsics]})
    logger.info("--policy.camera_intrinsics='%s'", flag)


if __name__ == "__main__":
    main()
