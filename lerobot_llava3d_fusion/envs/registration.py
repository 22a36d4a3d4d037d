"""Registering the package's env types and env processor steps without putting the policy at risk.

LeRobot imports every installed `lerobot_policy_*` package before parsing its command line and
skips a package whose import raises; draccus and LeRobot's processor registry raise when a name is
registered twice. Another plugin with an env type `touch_block` or `libero_rgbd` would then take
`llava3d_fusion` down with it. These decorators register as usual, and on a clash leave the other
package's registration in place and log which of ours is unavailable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lerobot.envs.configs import EnvConfig
from lerobot.processor import ProcessorStepRegistry

logger = logging.getLogger(__name__)


def env_type(name: str) -> Callable[[type], type]:
    """`EnvConfig.register_subclass(name)`, or a logged warning if `name` belongs to someone else."""

    def register(cls: type) -> type:
        try:
            return EnvConfig.register_subclass(name)(cls)
        except ValueError:
            other = EnvConfig.get_choice_class(name)
            logger.warning(
                "--env.type=%s is already registered by %s.%s: this package's %s is not available "
                "under that name (the llava3d_fusion policy is unaffected).",
                name,
                other.__module__,
                other.__qualname__,
                cls.__qualname__,
            )
            return cls

    return register


def processor_step(name: str) -> Callable[[type], type]:
    """`ProcessorStepRegistry.register(name)`, or a logged warning if `name` is already taken."""

    def register(cls: type) -> type:
        try:
            return ProcessorStepRegistry.register(name=name)(cls)
        except ValueError:
            logger.warning(
                "processor step %r is already registered by another package: this package's %s is used "
                "directly by its env but cannot be reloaded by that name.",
                name,
                cls.__qualname__,
            )
            return cls

    return register
