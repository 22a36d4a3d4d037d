"""Where a camera's metric depth comes from: the sources behind the config's `geometry` option.

Each source is one class behind the `GeometrySource` interface, registered in `GEOMETRY_SOURCES` under
the value users write (`--policy.geometry=<name>`, saved in every checkpoint's config.json):

    "none"       NoGeometry       a plain 2D VLA: no camera gets 3D points
    "depth"      RecordedDepth    observation.depth.<cam> from the dataset, env or robot
    "estimator"  EstimatedDepth   a monocular depth-estimation model run on each camera's image

The config, the preprocessor, the policy and the model ask the source (`config.geometry_source`)
instead of comparing strings. From a source's depth the model gets per-patch 3D points the same way
for every source (back-projection with the camera's intrinsics, `geometry.py`). A new source is one
class here and one entry in `GEOMETRY_SOURCES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from lerobot.configs import DEPTH_METER_UNIT, DEPTH_MILLIMETER_UNIT, PolicyFeature
from lerobot.processor import ProcessorStep
from torch import Tensor, nn

from lerobot_llava3d_fusion.geometry.depth_estimation import MonocularDepthEstimator
from lerobot_llava3d_fusion.geometry.robot_depth import MM_PER_METRE, DepthToMetresStep, depth_sources
from lerobot_llava3d_fusion.observation_keys import depth_key, robot_depth_key

# Metres. No real depth map lies entirely closer than this: one declared as millimetres that does
# was recorded in metres.
MIN_PLAUSIBLE_DEPTH = 0.01

if TYPE_CHECKING:
    from lerobot_llava3d_fusion.configuration_llava3d_fusion import Llava3DFusionConfig
    from lerobot_llava3d_fusion.model.network import CameraGeometry


class GeometrySource(ABC):
    """One way of giving cameras metric depth, from the config through the batch to the model."""

    name: ClassVar[str]  # the config value
    # The model builds a 3D point encoder (`geometry_encoder`) only for sources that give points.
    needs_3d_encoder: ClassVar[bool] = True

    def check_config(self, config: Llava3DFusionConfig) -> None:
        """Raise naming the field when the config lacks what this source needs."""

    @abstractmethod
    def camera_keys(self, camera_keys: list[str], features: dict[str, PolicyFeature]) -> list[str]:
        """The cameras, of the policy's real (not empty) `camera_keys`, that get 3D points."""

    def check_features(self, camera_keys: list[str], features: dict[str, PolicyFeature]) -> None:
        """Raise when the input features cannot feed this source; `camera_keys`: `self.camera_keys(...)`."""

    def preprocessor_steps(
        self, camera_keys: list[str], features: dict[str, PolicyFeature]
    ) -> list[ProcessorStep]:
        """The policy preprocessor's steps that bring this source's inputs into the batch."""
        return []

    def batch_depth(
        self,
        batch: dict[str, Tensor],
        camera_key: str,
        batch_size: int,
        max_depth: float,
        unit: str = DEPTH_METER_UNIT,
    ) -> Tensor | None:
        """The camera's depth (B, 1, H, W) in metres, or None if not read from the batch; `unit`: the
        unit the batch carries it in (`DEPTH_METER_UNIT` or `DEPTH_MILLIMETER_UNIT`)."""
        return None

    def build_depth_model(self, config: Llava3DFusionConfig) -> nn.Module | None:
        """The network this source runs to get depth (part of the policy's weights), if any."""
        return None

    @abstractmethod
    def metric_depth(
        self, image: Tensor, camera: CameraGeometry, depth_model: nn.Module | None
    ) -> tuple[Tensor, Tensor] | None:
        """Metric depth (B, 1, H, W) of one camera and the intrinsics (B, 3, 3) of its pixel grid.

        `image`: the camera's (B, 3, H_img, W_img) in [0, 1]; `camera`: what the policy gathered for it
        (`batch_depth` and the camera matrices); `depth_model`: `build_depth_model`'s network.
        """


class NoGeometry(GeometrySource):
    """A plain 2D VLA: no camera gets 3D points and the model has no 3D encoder."""

    name = "none"
    needs_3d_encoder = False

    def camera_keys(self, camera_keys: list[str], features: dict[str, PolicyFeature]) -> list[str]:
        return []

    def metric_depth(
        self, image: Tensor, camera: CameraGeometry, depth_model: nn.Module | None
    ) -> tuple[Tensor, Tensor] | None:
        return None


class RecordedDepth(GeometrySource):
    """Depth recorded next to the image: `observation.depth.<cam>` in metres (robots' `<cam>_depth` in
    millimetres is moved there by the preprocessor). Only cameras with a depth feature get 3D points."""

    name = "depth"

    def camera_keys(self, camera_keys: list[str], features: dict[str, PolicyFeature]) -> list[str]:
        return [key for key in camera_keys if depth_key(key) in features or robot_depth_key(key) in features]

    def check_features(self, camera_keys: list[str], features: dict[str, PolicyFeature]) -> None:
        if not camera_keys:
            raise ValueError(
                f"geometry={self.name!r} needs a depth feature for at least one camera (observation.depth.<cam> "
                f"next to observation.images.<cam>); input_features are {sorted(features)}."
            )

    def preprocessor_steps(
        self, camera_keys: list[str], features: dict[str, PolicyFeature]
    ) -> list[ProcessorStep]:
        # Each camera's depth to observation.depth.<cam> in metres (LeRobot robots: <cam>_depth, mm).
        return [DepthToMetresStep(depth_keys=depth_sources(camera_keys, features))]

    def batch_depth(
        self,
        batch: dict[str, Tensor],
        camera_key: str,
        batch_size: int,
        max_depth: float,
        unit: str = DEPTH_METER_UNIT,
    ) -> Tensor:
        key = depth_key(camera_key)
        if key not in batch:
            raise KeyError(
                f"{key!r} missing from the batch (geometry={self.name!r} uses it for {camera_key})."
            )
        depth = batch[key].float()
        if depth.ndim == 3:
            depth = depth[:, None]
        if depth.ndim != 4 or depth.shape[:2] != (batch_size, 1):
            raise ValueError(f"{key}: expected depth of shape (B, 1, H, W), got {tuple(depth.shape)}")
        if torch.isnan(depth).any():
            raise ValueError(f"{key} contains NaN values (mark missing depth with 0 instead).")
        if unit == DEPTH_MILLIMETER_UNIT:
            depth = depth / MM_PER_METRE
        # Checked per sample: one sample in the wrong unit must not hide among right ones.
        values = depth.flatten(1)  # (B, H * W)
        measured = (values > 0) & torch.isfinite(values)  # 0 / inf mark missing depth
        has_measurement = measured.any(dim=1)
        beyond = has_measurement & ~(measured & (values <= max_depth)).any(dim=1)
        if beyond.any():
            # Every measurement out of range: most likely millimetres read as metres. The 3D points
            # would silently switch off.
            sample = beyond.nonzero()[0].item()
            raise ValueError(
                f"{key}: in sample(s) {beyond.nonzero().flatten().tolist()}, every depth value is beyond "
                f"geometry_max_depth={max_depth} m (max {values[sample][measured[sample]].max().item():g}); "
                "depth must be in metres. In training, LeRobot datasets return depth maps in millimetres "
                "unless loaded with --dataset.depth_output_unit=m, and the streaming reader "
                "(--dataset.streaming=true) always does: train with --policy.dataset_depth_unit=mm."
            )
        if unit == DEPTH_MILLIMETER_UNIT:
            too_close = has_measurement & ~(measured & (values >= MIN_PLAUSIBLE_DEPTH)).any(dim=1)
            if too_close.any():
                sample = too_close.nonzero()[0].item()
                raise ValueError(
                    f"{key}: read as millimetres (dataset_depth_unit='mm'), every depth value of sample(s) "
                    f"{too_close.nonzero().flatten().tolist()} is closer than "
                    f"{MIN_PLAUSIBLE_DEPTH * 100:g} cm "
                    f"(max {values[sample][measured[sample]].max().item():g} m): the batch carries metres "
                    "(--dataset.depth_output_unit=m); train with --policy.dataset_depth_unit=m."
                )
        return depth

    def metric_depth(
        self, image: Tensor, camera: CameraGeometry, depth_model: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        return camera.depth, camera.intrinsics


class EstimatedDepth(GeometrySource):
    """Depth from a frozen monocular depth-estimation model (`depth_estimator_name`) run on every camera's
    image, for robots that record none. Every real camera gets 3D points; each needs intrinsics."""

    name = "estimator"

    def check_config(self, config: Llava3DFusionConfig) -> None:
        if not config.depth_estimator_name:
            raise ValueError(
                f"geometry={self.name!r} needs depth_estimator_name (a depth-estimation checkpoint)."
            )

    def camera_keys(self, camera_keys: list[str], features: dict[str, PolicyFeature]) -> list[str]:
        return list(camera_keys)

    def build_depth_model(self, config: Llava3DFusionConfig) -> MonocularDepthEstimator:
        return MonocularDepthEstimator(config.depth_estimator_name)

    def metric_depth(
        self, image: Tensor, camera: CameraGeometry, depth_model: nn.Module | None
    ) -> tuple[Tensor, Tensor]:
        # The intrinsics describe the image's grid; the estimator rescales them to its depth's grid.
        return depth_model(image, camera.intrinsics)


# The config values, in the order error messages list them.
GEOMETRY_SOURCES: dict[str, GeometrySource] = {
    source.name: source for source in (NoGeometry(), RecordedDepth(), EstimatedDepth())
}
