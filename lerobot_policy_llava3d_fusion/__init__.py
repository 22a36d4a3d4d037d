"""Discovery shim: LeRobot imports distributions named ``lerobot_policy_*``; this registers llava3d_fusion."""

import lerobot_llava3d_fusion  # noqa: F401
