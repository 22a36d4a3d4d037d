"""Environments registered with LeRobot on import.

``touch_block`` (the closed-loop demo task) and ``libero_rgbd`` (LeRobot's LIBERO plus per-camera
metric depth and camera matrices). Neither import loads a simulator.
"""

from lerobot_llava3d_fusion.envs import configs, libero_rgbd  # noqa: F401  (register --env.type=touch_block / libero_rgbd)
