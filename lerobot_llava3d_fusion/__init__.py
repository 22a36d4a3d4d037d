"""llava3d_fusion: a 3D-aware LLaVA-family vision-language-action policy for LeRobot.

Importing the package registers with LeRobot the policy type ``llava3d_fusion`` (and its
processor steps), then the environment types ``touch_block`` (the closed-loop demo task) and
``libero_rgbd``; an env type another package already registered is skipped with a warning, never
at the policy's expense. The policy and processor modules are found by LeRobot's naming convention.
"""
# ruff: noqa: I001 (the policy registers before the env types)

from lerobot_llava3d_fusion.configuration_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.processor_llava3d_fusion import make_llava3d_fusion_pre_post_processors

from lerobot_llava3d_fusion import envs  # noqa: E402, F401  (registers the environment types, after the policy)

__all__ = ["Llava3DFusionConfig", "make_llava3d_fusion_pre_post_processors"]
