"""The geometry sources behind the `geometry` option: registry, what each reads, and adding one."""

import pytest
import torch
from helpers import CAMERAS, preprocess, raw_batch, tiny_config
from lerobot.configs import FeatureType, PolicyFeature
from test_policy_geometry import DEPTH_SIZE, INTRINSICS, geometry_policy, prefix_of

from lerobot_llava3d_fusion.geometry.robot_depth import DepthToMetresStep
from lerobot_llava3d_fusion.geometry.sources import (
    GEOMETRY_SOURCES,
    EstimatedDepth,
    GeometrySource,
    NoGeometry,
    RecordedDepth,
)
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

# The top camera records depth under the policy's key, the wrist camera under a LeRobot robot's.
FEATURES = {
    **{key: PolicyFeature(FeatureType.VISUAL, (3, 40, 40)) for key in CAMERAS},
    "observation.depth.top": PolicyFeature(FeatureType.VISUAL, (1, DEPTH_SIZE, DEPTH_SIZE)),
    "observation.images.wrist_depth": PolicyFeature(FeatureType.VISUAL, (1, DEPTH_SIZE, DEPTH_SIZE)),
}


def test_the_config_values_name_the_sources():
    assert {name: type(source) for name, source in GEOMETRY_SOURCES.items()} == {
        "none": NoGeometry,
        "depth": RecordedDepth,
        "estimator": EstimatedDepth,
    }
    assert [name for name, source in GEOMETRY_SOURCES.items() if source.needs_3d_encoder] == [
        "depth",
        "estimator",
    ]
    assert tiny_config(geometry="depth").geometry_source is GEOMETRY_SOURCES["depth"]
    with pytest.raises(ValueError, match=r"geometry must be one of \('none', 'depth', 'estimator'\)"):
        tiny_config(geometry="lidar")


def test_recorded_depth_in_millimetres_is_read_as_metres_and_implausible_units_are_refused():
    metres = torch.rand(2, 1, DEPTH_SIZE, DEPTH_SIZE) + 0.5
    metres[0, 0, 0, 0] = 0.0  # a missing measurement stays missing
    read = GEOMETRY_SOURCES["depth"].batch_depth(
        {"observation.depth.top": metres * 1000}, CAMERAS[0], batch_size=2, max_depth=10.0, unit="mm"
    )
    torch.testing.assert_close(read, metres)
    with pytest.raises(ValueError, match="dataset_depth_unit=mm"):
        GEOMETRY_SOURCES["depth"].batch_depth(
            {"observation.depth.top": metres * 1000}, CAMERAS[0], batch_size=2, max_depth=10.0
        )
    with pytest.raises(ValueError, match="dataset_depth_unit=m\\."):
        GEOMETRY_SOURCES["depth"].batch_depth(
            {"observation.depth.top": metres}, CAMERAS[0], batch_size=2, max_depth=10.0, unit="mm"
        )
    with pytest.raises(ValueError, match=r"dataset_depth_unit must be one of \('m', 'mm'\)"):
        tiny_config(geometry="depth", dataset_depth_unit="cm")


def test_which_cameras_get_3d_points():
    cameras = list(CAMERAS)
    assert GEOMETRY_SOURCES["none"].camera_keys(cameras, FEATURES) == []
    assert GEOMETRY_SOURCES["estimator"].camera_keys(cameras, FEATURES) == cameras
    assert GEOMETRY_SOURCES["depth"].camera_keys(cameras, FEATURES) == cameras
    only_top = {key: ft for key, ft in FEATURES.items() if key != "observation.images.wrist_depth"}
    assert GEOMETRY_SOURCES["depth"].camera_keys(cameras, only_top) == [CAMERAS[0]]
    with pytest.raises(ValueError, match="needs a depth feature for at least one camera"):
        GEOMETRY_SOURCES["depth"].check_features([], only_top)


def test_only_recorded_depth_adds_a_preprocessor_step():
    cameras = list(CAMERAS)
    (step,) = GEOMETRY_SOURCES["depth"].preprocessor_steps(cameras, FEATURES)
    assert isinstance(step, DepthToMetresStep)
    assert step.depth_keys == {
        "observation.depth.top": "observation.depth.top",
        "observation.images.wrist_depth": "observation.depth.wrist",
    }
    assert GEOMETRY_SOURCES["none"].preprocessor_steps(cameras, FEATURES) == []
    assert GEOMETRY_SOURCES["estimator"].preprocessor_steps(cameras, FEATURES) == []


def test_recorded_depth_is_read_from_the_batch_and_the_others_read_none():
    depth = torch.rand(2, DEPTH_SIZE, DEPTH_SIZE, dtype=torch.float64) + 0.5  # (B, H, W)
    batch = {"observation.depth.top": depth}
    read = GEOMETRY_SOURCES["depth"].batch_depth(batch, CAMERAS[0], batch_size=2, max_depth=10.0)
    assert read.dtype == torch.float32 and torch.equal(read, depth.float()[:, None])
    with pytest.raises(KeyError, match="observation.depth.wrist"):
        GEOMETRY_SOURCES["depth"].batch_depth(batch, CAMERAS[1], batch_size=2, max_depth=10.0)
    for name in ("none", "estimator"):
        assert GEOMETRY_SOURCES[name].batch_depth(batch, CAMERAS[0], batch_size=2, max_depth=10.0) is None


class PlaneAtOneMetre(GeometrySource):
    """A new source, for the test: every camera sees a plane 1 m away, on the recorded depth's grid."""

    name = "plane"

    def camera_keys(self, camera_keys, features):
        return list(camera_keys)

    def metric_depth(self, image, camera, depth_model):
        return torch.ones(image.shape[0], 1, DEPTH_SIZE, DEPTH_SIZE), camera.intrinsics


def test_a_new_source_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(GEOMETRY_SOURCES, "plane", PlaneAtOneMetre())
    torch.manual_seed(0)
    plane = Llava3DFusionPolicy(
        tiny_config(
            geometry="plane",
            camera_intrinsics={"top": INTRINSICS, "wrist": INTRINSICS},
            geometry_gate_init=1.0,
        )
    )
    assert plane.model.geometry_encoder is not None
    batch = preprocess(plane, raw_batch())
    # Its 3D points are those of the same plane recorded as depth.
    recorded = geometry_policy(geometry_gate_init=1.0)
    recorded.load_state_dict(plane.state_dict())
    recorded_batch = dict(batch)
    for key in CAMERAS:
        name = key.removeprefix("observation.images.")
        recorded_batch[f"observation.depth.{name}"] = torch.ones(2, 1, DEPTH_SIZE, DEPTH_SIZE)
    plane_prefix = prefix_of(plane, batch)[0]
    torch.testing.assert_close(plane_prefix, prefix_of(recorded, recorded_batch)[0], atol=0, rtol=0)
    # ... and they matter: without them the prefix differs.
    inputs = plane._prepare_inputs(batch)
    flat = plane.model.embed_prefix(inputs.images, [None, None], inputs.lang_tokens, inputs.lang_mask)[0]
    assert not torch.allclose(plane_prefix, flat, atol=1e-4)
