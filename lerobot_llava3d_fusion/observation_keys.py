"""Observation keys of camera geometry: the one place that spells them.

The policy, its env processor steps and its dataset writers all use these names. Per camera ``<cam>``,
whose image is ``observation.images.<cam>``:

    observation.depth.<cam>         float32 (1, H, W), metres along the camera's optical axis, 0 = invalid
    observation.intrinsics.<cam>    float32 (3, 3), pinhole K of that depth grid
    observation.extrinsics.<cam>    float32 (4, 4), camera-to-world

LeRobot robots with a depth camera deliver it as ``observation.images.<cam>_depth`` instead
(:func:`robot_depth_key`; ``robot_depth.py`` converts it).

Envs return the geometry as top-level arrays next to ``pixels``, which LeRobot's
``preprocess_observation`` passes through as ``observation.<entry>``: ``depth`` / ``intrinsics`` /
``extrinsics`` for a one-camera env (touch_block), ``depth_<cam>`` ... for a multi-camera one
(libero_rgbd). :func:`env_geometry_entry` names them, :func:`parse_env_geometry_key` reads them back and
the env processor steps move them to the per-camera keys above with :func:`geometry_key`.
"""

from __future__ import annotations

from lerobot.utils.constants import OBS_IMAGES, OBS_STR

IMAGE_PREFIX = f"{OBS_IMAGES}."

# The geometry entries of a camera, and the shapes they have without batch dimension.
DEPTH = "depth"
INTRINSICS = "intrinsics"
EXTRINSICS = "extrinsics"
GEOMETRY_ENTRIES = (DEPTH, INTRINSICS, EXTRINSICS)
CAMERA_MATRIX_SHAPES = {INTRINSICS: (3, 3), EXTRINSICS: (4, 4)}

DEPTH_PREFIX = f"{OBS_STR}.{DEPTH}."
INTRINSICS_PREFIX = f"{OBS_STR}.{INTRINSICS}."
EXTRINSICS_PREFIX = f"{OBS_STR}.{EXTRINSICS}."
GEOMETRY_PREFIXES = (DEPTH_PREFIX, INTRINSICS_PREFIX, EXTRINSICS_PREFIX)
CAMERA_MATRIX_PREFIXES = (INTRINSICS_PREFIX, EXTRINSICS_PREFIX)

# (B, 3) origin of the 3D points with geometry_origin="state": the raw (unnormalized) state position the
# preprocessor copies before the normalizer (`Llava3DFusionGeometryOriginStep`); not a dataset feature.
GEOMETRY_ORIGIN = f"{OBS_STR}.geometry_origin"

ROBOT_DEPTH_SUFFIX = "_depth"  # LeRobot robots: camera "<cam>" with use_depth=True adds "<cam>_depth"


def camera_name(camera_key: str) -> str:
    """``observation.images.<cam>`` -> ``<cam>``."""
    return camera_key.removeprefix(IMAGE_PREFIX)


def geometry_key(entry: str, camera: str) -> str:
    """Policy / dataset key of a camera's geometry entry, e.g. ``("depth", "top")`` -> ``observation.depth.top``."""
    if entry not in GEOMETRY_ENTRIES:
        raise ValueError(f"unknown camera geometry entry {entry!r}; expected one of {GEOMETRY_ENTRIES}")
    return f"{OBS_STR}.{entry}.{camera}"


def depth_key(camera_key: str) -> str:
    """``observation.images.<cam>`` -> ``observation.depth.<cam>``."""
    return geometry_key(DEPTH, camera_name(camera_key))


def intrinsics_key(camera_key: str) -> str:
    """``observation.images.<cam>`` -> ``observation.intrinsics.<cam>``."""
    return geometry_key(INTRINSICS, camera_name(camera_key))


def extrinsics_key(camera_key: str) -> str:
    """``observation.images.<cam>`` -> ``observation.extrinsics.<cam>``."""
    return geometry_key(EXTRINSICS, camera_name(camera_key))


def robot_depth_key(camera_key: str) -> str:
    """``observation.images.<cam>`` -> ``observation.images.<cam>_depth`` (LeRobot robots' depth key)."""
    return camera_key + ROBOT_DEPTH_SUFFIX


def is_camera_matrix_key(key: str) -> bool:
    """True for ``observation.intrinsics.<cam>`` and ``observation.extrinsics.<cam>``."""
    return key.startswith(CAMERA_MATRIX_PREFIXES)


# ---- Env side ---------------------------------------------------------------------------------------


def env_geometry_entry(entry: str, camera: str | None = None) -> str:
    """Top-level key of a geometry array in an env's observation: ``depth`` (the env's only camera) or
    ``depth_<cam>``."""
    if entry not in GEOMETRY_ENTRIES:
        raise ValueError(f"unknown camera geometry entry {entry!r}; expected one of {GEOMETRY_ENTRIES}")
    return entry if camera is None else f"{entry}_{camera}"


def env_geometry_key(entry: str, camera: str | None = None) -> str:
    """What ``preprocess_observation`` makes of :func:`env_geometry_entry`: ``observation.depth[_<cam>]``."""
    return f"{OBS_STR}.{env_geometry_entry(entry, camera)}"


def parse_env_geometry_key(key: str) -> tuple[str, str | None] | None:
    """``observation.depth`` -> ``("depth", None)``, ``observation.depth_image2`` -> ``("depth", "image2")``;
    None for any other key (per-camera policy keys included)."""
    name = key.removeprefix(f"{OBS_STR}.")
    if name == key:
        return None
    for entry in GEOMETRY_ENTRIES:
        if name == entry:
            return entry, None
        if name.startswith(f"{entry}_") and len(name) > len(entry) + 1:
            return entry, name.removeprefix(f"{entry}_")
    return None


# ---- Dataset features -------------------------------------------------------------------------------


def camera_geometry_features(camera: str, height: int, width: int) -> dict[str, dict]:
    """LeRobotDataset features of one camera's geometry.

    The depth map is LeRobot's depth-map image: float32 metres, stored losslessly (raw TIFF), typed VISUAL
    (1, H, W) by ``dataset_to_policy_features``; the camera matrices are float features, typed STATE.
    """
    return {
        geometry_key(DEPTH, camera): {
            "dtype": "image",
            "shape": (height, width, 1),
            "names": ["height", "width", "channels"],
            "info": {"is_depth_map": True, "depth_unit": "m"},
        },
        **{
            geometry_key(entry, camera): {"dtype": "float32", "shape": shape, "names": ["rows", "cols"]}
            for entry, shape in CAMERA_MATRIX_SHAPES.items()
        },
    }
