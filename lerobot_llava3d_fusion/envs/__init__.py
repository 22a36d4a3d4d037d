"""Environments registered with LeRobot on import: ``touch_block`` (demo task)."""

from . import configs  # noqa: F401  (registers --env.type=touch_block and its processor step)
