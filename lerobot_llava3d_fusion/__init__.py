"""llava3d_fusion: a 3D-aware LLaVA-family vision-language-action policy for LeRobot.

Importing the package registers with LeRobot the policy type ``llava3d_fusion`` (and its
processor steps) and the environment type ``touch_block`` (the closed-loop demo task); the policy
and processor modules are found by LeRobot's naming convention.
"""

from . import envs  # noqa: F401  (registers the environment types)
from .configuration_llava3d_fusion import Llava3DFusionConfig
from .processor_llava3d_fusion import make_llava3d_fusion_pre_post_processors

__all__ = ["Llava3DFusionConfig", "make_llava3d_fusion_pre_post_processors"]
