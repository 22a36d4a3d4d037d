"""A LeRobot robot without hardware: four joints and a RealSense-like camera ``front`` with depth.

Its observation follows LeRobot 0.6.1's convention for a depth camera (``use_depth=True``): ``front``
RGB ``uint8`` (H, W, 3) and ``front_depth`` ``uint16`` (H, W, 1) millimetres, 0 where nothing was
measured. LeRobot's factories find the robot class next to its config
(``make_device_from_device_class``), so ``RobotClient`` builds it from ``FakeDepthRobotConfig``.
Every observation is the same one (``depth_robot_observation(config.seed)``); the actions it receives
through ``send_action`` are kept, in order, in ``config.sent_actions``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from lerobot.robots import Robot, RobotConfig
from lerobot.utils.feature_utils import hw_to_dataset_features

JOINTS = ("shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "gripper.pos")
SIZE = 32
TASK = "pick up the cube"


def depth_robot_observation(seed: int = 0, size: int = SIZE) -> dict[str, Any]:
    """``robot.get_observation()``: joints, RGB uint8 (H, W, 3), depth uint16 mm (H, W, 1)."""
    rng = np.random.default_rng(seed)
    observation: dict[str, Any] = {joint: float(rng.normal()) for joint in JOINTS}
    observation["front"] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    depth = rng.integers(400, 1500, (size, size, 1)).astype(np.uint16)  # 0.4-1.5 m
    depth[:3] = 0  # no measurement
    observation["front_depth"] = depth
    return observation


@RobotConfig.register_subclass("fake_depth_robot")
@dataclass
class FakeDepthRobotConfig(RobotConfig):
    seed: int = 0
    sent_actions: list = field(default_factory=list)


class FakeDepthRobot(Robot):
    config_class = FakeDepthRobotConfig
    name = "fake_depth_robot"

    def __init__(self, config: FakeDepthRobotConfig):
        super().__init__(config)
        self.config = config
        self._connected = False
        self._action_received = threading.Condition()

    @property
    def observation_features(self) -> dict:
        return {
            **{joint: float for joint in JOINTS},
            "front": (SIZE, SIZE, 3),
            "front_depth": (SIZE, SIZE, 1),
        }

    @property
    def action_features(self) -> dict:
        return {joint: float for joint in JOINTS}

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self, calibrate: bool = True) -> None:
        self._connected = True

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def get_observation(self) -> dict[str, Any]:
        return depth_robot_observation(self.config.seed)

    def send_action(self, action: dict[str, float]) -> dict[str, float]:
        with self._action_received:
            self.config.sent_actions.append(dict(action))
            self._action_received.notify_all()
        return action

    def wait_for_actions(self, count: int, timeout: float) -> bool:
        """Whether ``send_action`` has received ``count`` actions, waiting at most ``timeout`` seconds."""
        with self._action_received:
            return self._action_received.wait_for(lambda: len(self.config.sent_actions) >= count, timeout)

    def disconnect(self) -> None:
        self._connected = False


def depth_robot_dataset_features() -> dict[str, dict]:
    """The dataset features LeRobot's client announces for this robot (and lerobot-record would store)."""
    observation = {
        **{joint: float for joint in JOINTS},
        "front": (SIZE, SIZE, 3),
        "front_depth": (SIZE, SIZE, 1),
    }
    return hw_to_dataset_features(observation, "observation", use_video=False)
