"""Another package's env type of the same name cannot take the llava3d_fusion policy down."""

import subprocess
import sys
import textwrap

CLASH = textwrap.dedent(
    """
    import logging
    from dataclasses import dataclass

    from lerobot.configs import PreTrainedConfig
    from lerobot.envs.configs import EnvConfig

    logging.basicConfig(level=logging.WARNING)


    @EnvConfig.register_subclass("touch_block")
    @dataclass
    class SomeoneElsesTouchBlock(EnvConfig):
        pass


    import lerobot_llava3d_fusion  # noqa: E402

    assert PreTrainedConfig.get_choice_class("llava3d_fusion").__name__ == "Llava3DFusionConfig"
    assert EnvConfig.get_choice_class("touch_block") is SomeoneElsesTouchBlock
    assert EnvConfig.get_choice_class("libero_rgbd").__name__ == "LiberoRGBDEnvConfig"
    print("policy registered")
    """
)


def test_an_env_type_registered_by_another_package_leaves_the_policy_usable():
    result = subprocess.run(
        [sys.executable, "-c", CLASH], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "policy registered" in result.stdout
    assert "--env.type=touch_block is already registered by __main__.SomeoneElsesTouchBlock" in result.stderr
