"""A preprocessed LeRobot batch -> the network's `ModelInputs`, checked.

Every input the policy reads is checked here, where its key is known, so a bad input fails naming
that key instead of surfacing as a shape error deep inside the network (or, worse, as a silently wrong
3D point): missing keys, shapes, one batch size for every per-sample input, non-finite values, images
outside float [0, 1], depth maps without a usable pixel, camera matrices that are not camera matrices.
Nothing is converted silently: LeRobot hands policies float images in [0, 1] (its datasets, and its
env and robot observation pipelines, convert uint8 frames), so anything else is an upstream bug.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch
from lerobot.configs import DEPTH_METER_UNIT
from lerobot.policies.common.vla_utils import pad_vector
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE
from torch import Tensor

from lerobot_llava3d_fusion.configuration_llava3d_fusion import EMPTY_CAMERA_PREFIX, Llava3DFusionConfig
from lerobot_llava3d_fusion.model.network import CameraGeometry, ModelInputs
from lerobot_llava3d_fusion.observation_keys import (
    GEOMETRY_ORIGIN,
    camera_name,
    depth_key,
    extrinsics_key,
    intrinsics_key,
)

logger = logging.getLogger(__name__)

# Slack on the [0, 1] image range, for resampling overshoot in user-side transforms.
IMAGE_RANGE_TOLERANCE = 1e-3
# Metres. A camera-to-world translation longer than this is taken for millimetres: any camera more than
# 5 cm from the world origin, expressed in millimetres, exceeds it, while real workcells (and the
# geometry_max_depth of 10 m by default) are far smaller. Express a far-away world frame relative to the
# robot instead.
MAX_CAMERA_TRANSLATION = 50.0


class BatchToModelInputs:
    """Builds `ModelInputs` from a batch that went through the policy's preprocessor."""

    def __init__(self, config: Llava3DFusionConfig, image_size: int):
        """`image_size`: the vision tower's input side (the blank image of an empty camera)."""
        self.config = config
        self.image_size = image_size
        # Samples accepted without a usable depth map (`allow_missing_depth`), per depth key.
        self.missing_depth_frames: Counter[str] = Counter()

    def __call__(
        self,
        batch: dict[str, Tensor],
        depth_unit: str = DEPTH_METER_UNIT,
        per_sample_keys: tuple[str, ...] = (),
    ) -> ModelInputs:
        """`depth_unit`: the unit of the batch's recorded depth maps (training batches: the config's
        `dataset_depth_unit`; observations at inference: metres); `per_sample_keys`: more keys whose
        first dimension must be the batch size too (training: the actions)."""
        cfg = self.config
        for key in (OBS_LANGUAGE_TOKENS, OBS_LANGUAGE_ATTENTION_MASK):
            if key not in batch:
                raise KeyError(
                    f"{key!r} missing from the batch: run the policy's preprocessor (it tokenizes the task)."
                )
        batch_size = self._check_batch_size(batch, per_sample_keys)
        lang_tokens, lang_mask = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK].bool()
        if not lang_mask.any(dim=1).all():
            raise ValueError(
                "a sample has an empty task: llava3d_fusion needs a task instruction per sample."
            )

        images, camera_present = [], []
        for key in cfg.camera_keys:
            if key not in batch and key.startswith(EMPTY_CAMERA_PREFIX):
                # pi0's empty camera: a blank image whose tokens are masked out.
                size = self.image_size
                images.append(torch.zeros(batch_size, 3, size, size, device=lang_tokens.device))
                camera_present.append(torch.zeros(batch_size, dtype=torch.bool, device=lang_tokens.device))
                continue
            if key not in batch:
                present = sorted(k for k in batch if k.startswith("observation."))
                raise KeyError(f"camera {key!r} missing from the batch; observation keys present: {present}")
            image = batch[key]
            if image.ndim != 4 or image.shape[1] != 3:
                raise ValueError(f"{key}: expected images of shape (B, 3, H, W), got {tuple(image.shape)}")
            _check_image_range(key, image)
            images.append(image)
            camera_present.append(None)

        point_cameras = set(cfg.geometry_camera_keys)
        origin = self._geometry_origin(batch, batch_size) if point_cameras else None  # shared by all cameras
        camera_geometry = [
            self._camera_geometry(batch, key, batch_size, origin, depth_unit)
            if key in point_cameras
            else None
            for key in cfg.camera_keys
        ]
        state = self._state(batch, batch_size, lang_tokens.device)
        return ModelInputs(images, camera_geometry, lang_tokens, lang_mask, state, camera_present)

    def _check_batch_size(self, batch: dict[str, Tensor], per_sample_keys: tuple[str, ...]) -> int:
        """The batch size every per-sample input agrees on (the task list's, as tokenized); raises
        naming each key and its size when they disagree. Unbatched camera matrices broadcast."""
        cfg = self.config
        matrix_keys = {
            key(camera) for camera in cfg.geometry_camera_keys for key in (intrinsics_key, extrinsics_key)
        }
        # The dimensions of one batched input: shorter means the batch dimension is missing.
        batched_dims = {OBS_LANGUAGE_ATTENTION_MASK: 2, OBS_STATE: 2, GEOMETRY_ORIGIN: 2}
        batched_dims |= {key: 4 for key in cfg.camera_keys}
        batched_dims |= {depth_key(key): 3 for key in cfg.geometry_camera_keys}
        batched_dims |= {key: 3 for key in matrix_keys} | {key: 1 for key in per_sample_keys}
        sizes = {OBS_LANGUAGE_TOKENS: batch[OBS_LANGUAGE_TOKENS].shape[0]}
        for key, dims in batched_dims.items():
            value = batch.get(key)
            if not isinstance(value, Tensor) or (key in matrix_keys and value.ndim == 2):
                continue  # absent (the checks below name it if needed), or one matrix for the whole batch
            if value.ndim < dims:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}, without a batch dimension: the policy takes "
                    "batches; add one (tensor[None]), or run the observation through the policy's "
                    "preprocessor, which adds it to images and state."
                )
            sizes[key] = value.shape[0]
        batch_size = sizes[OBS_LANGUAGE_TOKENS]
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{key}: {size}" for key, size in sizes.items())
            raise ValueError(
                f"the batch's inputs disagree on the batch size ({listed}; {OBS_LANGUAGE_TOKENS} counts the "
                "tasks): every per-sample input needs the same number of samples."
            )
        if batch_size == 0:
            raise ValueError("the batch is empty (batch size 0): the policy needs at least one sample.")
        return batch_size

    def _camera_geometry(
        self,
        batch: dict[str, Tensor],
        camera_key: str,
        batch_size: int,
        origin: Tensor | None,
        depth_unit: str,
    ) -> CameraGeometry:
        """The depth the geometry source reads from the batch (none when it estimates depth) and the
        camera matrices of one camera, from the batch or the config; `origin` (B, 3) or None."""
        cfg = self.config
        name = camera_name(camera_key)
        device = batch[OBS_LANGUAGE_TOKENS].device
        depth = cfg.geometry_source.batch_depth(
            batch, camera_key, batch_size, cfg.geometry_max_depth, depth_unit
        )
        if depth is not None:
            self._check_depth_usable(depth_key(camera_key), depth)
        intrinsics = _camera_matrix(
            batch, intrinsics_key(camera_key), cfg.camera_intrinsics.get(name), 3, device
        )
        if intrinsics is None:
            raise KeyError(
                f"no intrinsics for camera {name!r}: put {intrinsics_key(camera_key)!r} in the observation or "
                f"set camera_intrinsics[{name!r}] in the policy config."
            )
        _check_pinhole(intrinsics_key(camera_key), intrinsics)
        if depth is not None:
            self._check_depth_grid(
                camera_key, depth, intrinsics, from_config=intrinsics_key(camera_key) not in batch
            )
        extrinsics = _camera_matrix(
            batch, extrinsics_key(camera_key), cfg.camera_extrinsics.get(name), 4, device
        )
        if extrinsics is not None:
            _check_rigid_transform(extrinsics_key(camera_key), extrinsics)
        return CameraGeometry(intrinsics=intrinsics, depth=depth, extrinsics=extrinsics, origin=origin)

    def _check_depth_usable(self, key: str, depth: Tensor) -> None:
        """Every sample's depth map (B, 1, H, W), metres, needs a pixel the 3D points can use (finite,
        in (0, geometry_max_depth]); without one the camera's 3D input is silently off for that
        sample. An error unless `allow_missing_depth`, which counts such samples and warns."""
        max_depth = self.config.geometry_max_depth
        usable = (torch.isfinite(depth) & (depth > 0) & (depth <= max_depth)).flatten(1).any(dim=1)
        if usable.all():
            return
        missing = (~usable).nonzero().flatten().tolist()
        if not self.config.allow_missing_depth:
            first = depth[missing[0]]
            raise ValueError(
                f"{key}: sample(s) {missing} have no usable depth pixel (sample {missing[0]}: min "
                f"{first.min().item():g}, max {first.max().item():g}; usable: finite and in "
                f"(0, geometry_max_depth={max_depth:g}] metres), so their 3D input would be silently off. "
                "Check the depth stream, or set allow_missing_depth=True (--policy.allow_missing_depth=true) "
                "to accept frames a sensor dropped."
            )
        before = self.missing_depth_frames[key]
        self.missing_depth_frames[key] += len(missing)
        if before == 0 or before.bit_length() != self.missing_depth_frames[key].bit_length():
            # Log-spaced (1, 2, 4, ...): a dead sensor does not flood the log.
            logger.warning(
                "%s: no usable depth pixel in %d frame(s) so far (allow_missing_depth=True): those frames "
                "get no 3D points from this camera.",
                key,
                self.missing_depth_frames[key],
            )

    def _geometry_origin(self, batch: dict[str, Tensor], batch_size: int) -> Tensor | None:
        """(B, 3) raw state position the 3D points are measured from (`geometry_origin="state"`), else None."""
        if self.config.geometry_origin != "state":
            return None
        if GEOMETRY_ORIGIN not in batch:
            raise KeyError(
                f"geometry_origin='state' needs {GEOMETRY_ORIGIN!r}, the raw state position the policy's "
                "preprocessor copies before normalizing the state: run the batch through that preprocessor "
                "(make_pre_post_processors / the checkpoint's policy_preprocessor)."
            )
        origin = batch[GEOMETRY_ORIGIN]
        if tuple(origin.shape) != (batch_size, 3):
            raise ValueError(
                f"{GEOMETRY_ORIGIN}: expected shape ({batch_size}, 3), got {tuple(origin.shape)}"
            )
        check_finite(GEOMETRY_ORIGIN, origin)
        return origin

    def _check_depth_grid(
        self, camera_key: str, depth: Tensor, intrinsics: Tensor, from_config: bool
    ) -> None:
        """The intrinsics must describe the depth image's pixel grid, or back-projection is silently wrong."""
        height, width = depth.shape[-2:]
        key = depth_key(camera_key)
        recorded = self.config.input_features[key].shape[-2:] if key in self.config.input_features else None
        if from_config and recorded is not None and tuple(recorded) != (height, width):
            raise ValueError(
                f"{key} is {height}x{width}, but camera_intrinsics[{camera_name(camera_key)!r}] of the config "
                f"describe the {recorded[0]}x{recorded[1]} depth the policy was trained on: resize the "
                "depth to that resolution, or give per-frame intrinsics for this one in "
                f"{intrinsics_key(camera_key)!r}."
            )
        principal_x, principal_y = intrinsics[..., 0, 2], intrinsics[..., 1, 2]
        if ((principal_x < 0) | (principal_x > width) | (principal_y < 0) | (principal_y > height)).any():
            raise ValueError(
                f"{key} is {height}x{width}, but {intrinsics_key(camera_key)} puts the principal point at "
                f"(cx, cy) = ({principal_x.max().item():g}, {principal_y.max().item():g}), outside it: the "
                f"intrinsics are for an image of about {2 * principal_y.max().item():.0f}x"
                f"{2 * principal_x.max().item():.0f}. They must describe the depth image's own pixel grid "
                "(scale fx, fy, cx, cy with the depth's resolution)."
            )

    def _state(self, batch: dict[str, Tensor], batch_size: int, device: torch.device) -> Tensor:
        """(B, max_state_dim) zero-padded state (zeros for a policy without one)."""
        cfg = self.config
        state_feature = cfg.robot_state_feature
        if state_feature is None:
            return torch.zeros(batch_size, cfg.max_state_dim, device=device)
        if OBS_STATE not in batch:
            raise KeyError(f"{OBS_STATE!r} missing from the batch (the policy was configured with a state).")
        state = batch[OBS_STATE]
        expected = state_feature.shape[-1]
        if state.ndim != 2 or state.shape[-1] != expected:
            raise ValueError(f"{OBS_STATE}: expected shape (B, {expected}), got {tuple(state.shape)}")
        check_finite(OBS_STATE, state)
        return pad_vector(state.float(), cfg.max_state_dim)


def _camera_matrix(batch, key: str, fallback, size: int, device) -> Tensor | None:
    """A camera matrix from the batch, else the config's `fallback` (unbatched, broadcast), else None."""
    matrix = batch[key] if key in batch else (torch.tensor(fallback, device=device) if fallback else None)
    if matrix is None:
        return None
    matrix = matrix.float()
    if matrix.shape[-2:] != (size, size):
        raise ValueError(
            f"{key}: expected a {size}x{size} matrix per sample, got shape {tuple(matrix.shape)}"
        )
    check_finite(key, matrix)
    return matrix


# Camera matrices are metric and must reach the policy as recorded; one that was normalised (or is
# simply not a camera matrix) fails these checks instead of silently bending the 3D positions. A focal
# length may be negative: a mirrored image (LIBERO's, see envs/libero_rgbd.py) has fx < 0 and
# back-projects exactly with it.
def _check_pinhole(key: str, intrinsics: Tensor) -> None:
    last_row = intrinsics.new_tensor([0.0, 0.0, 1.0])
    focal = intrinsics[..., [0, 1], [0, 1]]
    if not (
        torch.allclose(intrinsics[..., 2, :], last_row.expand_as(intrinsics[..., 2, :]))
        and (focal != 0).all()
    ):
        raise ValueError(
            f"{key} is not a pinhole matrix [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy != 0 (got "
            f"{intrinsics.reshape(-1, 3, 3)[0].tolist()}). Camera matrices must reach the policy as recorded: "
            "were they normalised?"
        )


def _check_rigid_transform(key: str, extrinsics: Tensor) -> None:
    rotation = extrinsics[..., :3, :3]
    identity = torch.eye(3, device=extrinsics.device).expand_as(rotation)
    with torch.autocast(extrinsics.device.type, enabled=False):  # a float32 check under bf16 training
        gram = rotation @ rotation.transpose(-1, -2)
        determinant = torch.linalg.det(rotation)
    last_row = extrinsics.new_tensor([0.0, 0.0, 0.0, 1.0]).expand_as(extrinsics[..., 3, :])
    if not (torch.allclose(extrinsics[..., 3, :], last_row) and torch.allclose(gram, identity, atol=1e-3)):
        raise ValueError(
            f"{key} is not a rigid camera-to-world transform [[R, t], [0, 0, 0, 1]] with R a rotation (got "
            f"{extrinsics.reshape(-1, 4, 4)[0].tolist()}). Camera matrices must reach the policy as recorded: "
            "were they normalised?"
        )
    if (determinant < 0).any():
        raise ValueError(
            f"{key} has a rotation with determinant {determinant.min().item():.3g}: a reflection, not a "
            "rotation (a left-handed frame, or one axis flipped), which mirrors the 3D points. Fix the "
            "camera's frame convention so that det(R) = +1."
        )
    translation = extrinsics[..., :3, 3].norm(dim=-1).max().item()
    if translation > MAX_CAMERA_TRANSLATION:
        raise ValueError(
            f"{key} puts the camera {translation:g} m from the world origin, more than "
            f"{MAX_CAMERA_TRANSLATION:g} m: the translation is most likely in millimetres. Camera "
            "matrices are in metres; for a world frame far from the robot, express the camera relative "
            "to the robot's base instead."
        )


def _check_image_range(key: str, image: Tensor) -> None:
    """Images are float in [0, 1], LeRobot's convention; uint8, 0..255 or [-1, 1] ones are refused
    (read as [0, 1] they would silently saturate or darken every frame)."""
    if not image.is_floating_point():
        raise ValueError(
            f"{key} is {image.dtype}: the policy takes float images in [0, 1] (LeRobot's convention). "
            "Convert with image.float() / 255, or run the observation through LeRobot's "
            "preprocess_observation / the dataset, which do."
        )
    low, high = torch.stack(torch.aminmax(image)).tolist()  # one host sync; NaN propagates to both
    if not (math.isfinite(low) and math.isfinite(high)):
        check_finite(key, image)  # raises, naming the NaN or inf
    if low < -IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
        hint = (
            "0..255 values: divide by 255" if high > 1 + IMAGE_RANGE_TOLERANCE else "undo the normalisation"
        )
        raise ValueError(
            f"{key} has values in [{low:g}, {high:g}]: the policy takes float images in [0, 1] (LeRobot's "
            f"convention; it normalises them for its vision tower itself): {hint}."
        )


def check_finite(key: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{key} contains NaN or inf values.")
