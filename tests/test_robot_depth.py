"""Depth from LeRobot robots' depth cameras (``observation.images.<cam>_depth``, uint16 millimetres).

No hardware: a fake robot observation in LeRobot 0.6.1's convention goes through the functions
``lerobot-rollout`` uses (``build_inference_frame``: ``build_dataset_frame`` +
``prepare_observation_for_inference``), the policy's preprocessor and the policy; a dataset recorded
in that convention goes through ``LeRobotDataset``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import fixed_noise  # noqa: E402
from lerobot.configs import FeatureType, PolicyFeature  # noqa: E402
from lerobot.policies.utils import build_inference_frame  # noqa: E402
from lerobot.utils.feature_utils import dataset_to_policy_features, hw_to_dataset_features  # noqa: E402

from lerobot_llava3d_fusion import Llava3DFusionConfig, make_llava3d_fusion_pre_post_processors  # noqa: E402
from lerobot_llava3d_fusion.geometry.robot_depth import (  # noqa: E402
    DepthToMetresStep,
    check_depth_features,
    depth_in_metres,
)
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy  # noqa: E402
from lerobot_llava3d_fusion.tools.realsense_intrinsics import rotated_intrinsics  # noqa: E402

SIZE = 32
JOINTS = ("shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "gripper.pos")
K = [[30.0, 0.0, 15.5], [0.0, 30.0, 15.5], [0.0, 0.0, 1.0]]
TASK = "pick up the cube"


def robot_features() -> dict[str, dict]:
    """Dataset features of an SO-100-like robot with a RealSense `front` (use_depth=True), as
    lerobot-record / lerobot-rollout build them from `robot.observation_features`."""
    observation = {
        **{joint: float for joint in JOINTS},
        "front": (SIZE, SIZE, 3),
        "front_depth": (SIZE, SIZE, 1),
    }
    return {
        **hw_to_dataset_features({joint: float for joint in JOINTS}, "action", use_video=False),
        **hw_to_dataset_features(observation, "observation", use_video=False),
    }


def robot_observation(seed: int = 0) -> dict:
    """`robot.get_observation()` of that robot: joints, RGB uint8 (H, W, 3), depth uint16 mm (H, W, 1)."""
    rng = np.random.default_rng(seed)
    observation = {joint: float(rng.normal()) for joint in JOINTS}
    observation["front"] = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    depth = rng.integers(400, 1500, (SIZE, SIZE, 1)).astype(np.uint16)  # 0.4-1.5 m
    depth[:3] = 0  # no measurement
    observation["front_depth"] = depth
    return observation


def make_policy(input_features: dict[str, PolicyFeature], seed: int = 0) -> Llava3DFusionPolicy:
    torch.manual_seed(seed)
    config = Llava3DFusionConfig(
        vlm_model_name="tiny", chunk_size=4, n_action_steps=4, num_steps=2, max_state_dim=8, max_action_dim=8,
        device="cpu", geometry="depth", geometry_gate_init=1.0, camera_intrinsics={"front": K},
        input_features=input_features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (len(JOINTS),))},
    )  # fmt: skip
    return Llava3DFusionPolicy(config)


def act(policy: Llava3DFusionPolicy, observation: dict) -> torch.Tensor:
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(policy.config, dataset_stats=None)
    noise = fixed_noise(policy, batch_size=1, seed=1)
    return policy.predict_action_chunk(preprocessor(observation), noise=noise)


def rollout_frame(observation: dict) -> dict:
    """What lerobot-rollout's sync inference hands the preprocessor for a robot observation."""
    return build_inference_frame(
        dict(observation), torch.device("cpu"), robot_features(), task=TASK, robot_type="so100_follower"
    )


def test_lerobot_features_keep_the_robots_names_and_attach_the_depth_to_its_camera():
    features = dataset_to_policy_features(robot_features())
    assert features["observation.images.front_depth"] == PolicyFeature(FeatureType.VISUAL, (1, SIZE, SIZE))
    policy = make_policy({k: v for k, v in features.items() if k != "action"})
    assert policy.config.camera_keys == ["observation.images.front"]  # the depth map is no camera
    assert policy.config.geometry_camera_keys == ["observation.images.front"]
    assert check_depth_features(policy.config.input_features) == {
        "observation.images.front_depth": "observation.images.front"
    }
    # lerobot-rollout's check without --rename_map (rollout/context.py): the policy's visual features
    # are the robot's cameras, depth included.
    expected_visuals = {k for k, v in policy.config.input_features.items() if v.type is FeatureType.VISUAL}
    assert expected_visuals == {"observation.images.front", "observation.images.front_depth"}


def test_robot_observation_in_millimetres_acts_like_metres_in_our_convention():
    """uint16 millimetres under LeRobot's key == float metres under ours; and the depth is used."""
    features = {k: v for k, v in dataset_to_policy_features(robot_features()).items() if k != "action"}
    robot_policy = make_policy(features)
    frame = rollout_frame(robot_observation())
    assert frame["observation.images.front_depth"].dtype == torch.uint16  # as the robot delivered it
    assert frame["observation.images.front_depth"].shape == (1, 1, SIZE, SIZE)

    ours = {("observation.depth.front" if k == "observation.images.front_depth" else k): v
            for k, v in features.items()}  # fmt: skip
    ours_policy = make_policy(ours, seed=1)
    ours_policy.load_state_dict(robot_policy.state_dict())
    depth_m = torch.from_numpy(robot_observation()["front_depth"].astype(np.float32) / 1000.0)
    ours_frame = {
        k: v for k, v in rollout_frame(robot_observation()).items() if k != "observation.images.front_depth"
    }
    ours_frame["observation.depth.front"] = depth_m.permute(2, 0, 1)[None]

    actions = act(robot_policy, frame)
    torch.testing.assert_close(actions, act(ours_policy, ours_frame), atol=1e-5, rtol=0)
    # Not a no-op: twice the depth gives other actions (the geometry gate is open in this policy).
    farther = robot_observation()
    farther["front_depth"] = farther["front_depth"] * 2
    assert (act(robot_policy, rollout_frame(farther)) - actions).abs().max() > 1e-4


def test_intrinsics_come_from_the_config_and_their_absence_is_named():
    features = {k: v for k, v in dataset_to_policy_features(robot_features()).items() if k != "action"}
    policy = make_policy(features)
    policy.config.camera_intrinsics = {}
    with pytest.raises(KeyError, match=r"camera_intrinsics\['front'\]"):
        act(policy, rollout_frame(robot_observation()))


def test_a_dataset_recorded_from_such_a_robot_trains(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = robot_features()
    dataset = LeRobotDataset.create("local/so100_depth", fps=30, features=features, root=tmp_path / "ds",
                                    robot_type="so100_follower", use_videos=False)  # fmt: skip
    for seed in range(3):
        observation = robot_observation(seed)
        frame = {"task": TASK, "action": np.zeros(len(JOINTS), dtype=np.float32),
                 "observation.state": np.array([observation[j] for j in JOINTS], dtype=np.float32),
                 "observation.images.front": observation["front"],
                 "observation.images.front_depth": observation["front_depth"]}  # fmt: skip
        dataset.add_frame(frame)
    dataset.save_episode()
    dataset.finalize()

    loaded = LeRobotDataset("local/so100_depth", root=tmp_path / "ds", depth_output_unit="m")
    assert loaded.meta.features["observation.images.front_depth"]["info"]["depth_unit"] == "mm"  # as recorded
    item = loaded[1]
    expected = torch.from_numpy(robot_observation(1)["front_depth"].astype(np.float32) / 1000).permute(
        2, 0, 1
    )
    torch.testing.assert_close(item["observation.images.front_depth"], expected)

    policy = make_policy(
        {k: v for k, v in dataset_to_policy_features(loaded.meta.features).items() if k != "action"}
    )
    batch = {k: (v[None] if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()}
    batch["action"] = torch.zeros(1, 4, len(JOINTS))
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(policy.config, dataset_stats=None)
    processed = preprocessor(batch)
    torch.testing.assert_close(processed["observation.depth.front"], expected[None])
    loss, _ = policy.forward(processed)
    assert torch.isfinite(loss)

    # Loaded in millimetres (LeRobot's default unit): float millimetres are refused, naming both fixes.
    in_mm = LeRobotDataset("local/so100_depth", root=tmp_path / "ds")[1]
    batch_mm = {**batch, "observation.images.front_depth": in_mm["observation.images.front_depth"][None]}
    with pytest.raises(ValueError, match="depth_output_unit=m.*dataset_depth_unit=mm"):
        policy.forward(preprocessor(batch_mm))

    # Told so (dataset_depth_unit="mm"), the same weights train on the millimetres exactly as on metres.
    noise, time = torch.randn(1, 4, 8), torch.full((1,), 0.3)
    loss_metres, _ = policy.forward(processed, noise=noise, time=time)
    policy.config.dataset_depth_unit = "mm"
    loss_millimetres, _ = policy.forward(preprocessor(batch_mm), noise=noise, time=time)
    torch.testing.assert_close(loss_millimetres, loss_metres)
    # Metres declared as millimetres are refused too.
    with pytest.raises(ValueError, match="dataset_depth_unit=m"):
        policy.forward(processed, noise=noise, time=time)
    # Observations at inference are metres whatever the training unit (environments; robots via the step).
    policy.config.dataset_depth_unit = "m"
    expected_chunk = act(policy, rollout_frame(robot_observation()))
    policy.config.dataset_depth_unit = "mm"
    torch.testing.assert_close(act(policy, rollout_frame(robot_observation())), expected_chunk)


def test_a_depth_map_the_policy_cannot_place_is_an_error_naming_the_key_and_the_fix():
    rgb = PolicyFeature(FeatureType.VISUAL, (3, SIZE, SIZE))
    depth = PolicyFeature(FeatureType.VISUAL, (1, SIZE, SIZE))
    state = {"observation.state": PolicyFeature(FeatureType.STATE, (len(JOINTS),))}
    # A depth camera streamed without its RGB (use_rgb=False), next to another camera.
    with pytest.raises(ValueError, match=r"'observation.images.wrist_depth'.*--rename_map") as error:
        make_policy({"observation.images.front": rgb, "observation.images.wrist_depth": depth, **state})
    assert "observation.images.wrist" in str(error.value)
    # A 1-channel image whose name does not say which camera it belongs to.
    with pytest.raises(ValueError, match="'observation.images.depth_cam' is a depth map"):
        make_policy({"observation.images.front": rgb, "observation.images.depth_cam": depth, **state})
    # Our key for a camera the policy does not have.
    with pytest.raises(ValueError, match="'observation.depth.side'"):
        make_policy({"observation.images.front": rgb, "observation.depth.side": depth, **state})
    # Two depth maps for one camera.
    with pytest.raises(ValueError, match="two depth maps"):
        make_policy({"observation.images.front": rgb, "observation.images.front_depth": depth,
                     "observation.depth.front": depth, **state})  # fmt: skip


def test_robot_depth_for_a_policy_trained_on_our_keys_needs_the_rename_it_names():
    """A policy trained on observation.depth.front (e.g. LIBERO RGB-D), run on a LeRobot depth camera."""
    features = {k: v for k, v in dataset_to_policy_features(robot_features()).items() if k != "action"}
    ours = {("observation.depth.front" if k == "observation.images.front_depth" else k): v
            for k, v in features.items()}  # fmt: skip
    policy = make_policy(ours)
    expected_fix = '--rename_map=\'{"observation.images.front_depth": "observation.depth.front"}\''
    with pytest.raises(KeyError) as error:
        act(policy, rollout_frame(robot_observation()))
    assert expected_fix in error.value.args[0]
    # With that rename (as lerobot-rollout applies it, first in the preprocessor) the millimetres are converted.
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(policy.config, dataset_stats=None)
    preprocessor.steps[0].rename_map = {"observation.images.front_depth": "observation.depth.front"}
    processed = preprocessor(rollout_frame(robot_observation()))
    depth = processed["observation.depth.front"]
    assert depth.dtype == torch.float32 and depth.shape == (1, 1, SIZE, SIZE)
    torch.testing.assert_close(
        depth[0, 0, 5], torch.from_numpy(robot_observation()["front_depth"][5, :, 0] / 1000).float()
    )
    assert torch.isfinite(policy.predict_action_chunk(processed)).all()


def test_depth_units_follow_lerobots_dtype_rule():
    millimetres = torch.tensor([[0, 500, 1234]], dtype=torch.uint16)
    torch.testing.assert_close(depth_in_metres(millimetres, "k"), torch.tensor([[0.0, 0.5, 1.234]]))
    metres = torch.tensor([[0.5, 1.25]], dtype=torch.float64)
    assert depth_in_metres(metres, "k").dtype == torch.float32 and depth_in_metres(metres, "k")[0, 1] == 1.25
    with pytest.raises(TypeError, match="k: depth of dtype torch.bool"):
        depth_in_metres(torch.ones(2, dtype=torch.bool), "k")
    step = DepthToMetresStep(depth_keys={"observation.images.front_depth": "observation.depth.front"})
    assert DepthToMetresStep(**step.get_config()).depth_keys == step.depth_keys  # saved with the checkpoint


@pytest.mark.parametrize("rotation", [0, 90, 180, -90])
def test_rotated_intrinsics_follow_lerobots_camera_rotation(rotation):
    """A point's pixel in the image rotated as LeRobot's cameras rotate frames is K' @ point."""
    width, height = 8, 6
    intrinsics = [[7.0, 0.0, 3.4], [0.0, 6.0, 2.6], [0.0, 0.0, 1.0]]
    point = np.array([0.1, -0.05, 1.0])
    u, v, w = np.array(intrinsics) @ point
    col, row = round(u / w), round(v / w)
    image = np.zeros((height, width), dtype=np.uint8)
    image[row, col] = 255
    code = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, -90: cv2.ROTATE_90_COUNTERCLOCKWISE}.get(
        rotation
    )
    rotated = image if code is None else cv2.rotate(image, code)
    new_row, new_col = np.argwhere(rotated == 255)[0]
    # K' maps the pixel-centred projection exactly; compare with the rounded pixel through the same map.
    pixel = (
        np.array(rotated_intrinsics(intrinsics, width, height, rotation))
        @ np.linalg.inv(intrinsics)
        @ [col, row, 1]
    )
    assert (round(pixel[1]), round(pixel[0])) == (new_row, new_col)
    with pytest.raises(ValueError, match="rotation must be one of"):
        rotated_intrinsics(intrinsics, width, height, 45)
