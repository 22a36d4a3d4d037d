"""A preprocessed LeRobot batch -> the network's `ModelInputs`, checked.

Every input the policy reads is checked here, where its key is known, so a bad input fails naming
that key instead of surfacing as a shape error deep inside the network (or, worse, as a silently wrong
3D point): missing keys, shapes, non-finite values, camera matrices that are not camera matrices.
"""

from __future__ import annotations

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


class BatchToModelInputs:
    """Builds `ModelInputs` from a batch that went through the policy's preprocessor."""

    def __init__(self, config: Llava3DFusionConfig, image_size: int):
        """`image_size`: the vision tower's input side (the blank image of an empty camera)."""
        self.config = config
        self.image_size = image_size

    def __call__(self, batch: dict[str, Tensor], depth_unit: str = DEPTH_METER_UNIT) -> ModelInputs:
        """`depth_unit`: the unit of the batch's recorded depth maps (training batches: the config's
        `dataset_depth_unit`; observations at inference: metres)."""
        cfg = self.config
        for key in (OBS_LANGUAGE_TOKENS, OBS_LANGUAGE_ATTENTION_MASK):
            if key not in batch:
                raise KeyError(
                    f"{key!r} missing from the batch: run the policy's preprocessor (it tokenizes the task)."
                )
        lang_tokens, lang_mask = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK].bool()
        if not lang_mask.any(dim=1).all():
            raise ValueError(
                "a sample has an empty task: llava3d_fusion needs a task instruction per sample."
            )

        batch_size = lang_tokens.shape[0]
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
            check_finite(key, image)
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
    last_row = extrinsics.new_tensor([0.0, 0.0, 0.0, 1.0]).expand_as(extrinsics[..., 3, :])
    if not (torch.allclose(extrinsics[..., 3, :], last_row) and torch.allclose(gram, identity, atol=1e-3)):
        raise ValueError(
            f"{key} is not a rigid camera-to-world transform [[R, t], [0, 0, 0, 1]] with R a rotation (got "
            f"{extrinsics.reshape(-1, 4, 4)[0].tolist()}). Camera matrices must reach the policy as recorded: "
            "were they normalised?"
        )


def check_finite(key: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{key} contains NaN or inf values.")
