"""The policy's optimizer preset: LeRobot's AdamW, optionally with torch's fused kernel."""

from dataclasses import dataclass

from lerobot.optim import AdamWConfig, OptimizerConfig


@OptimizerConfig.register_subclass("llava3d_fusion_adamw")
@dataclass
class FusedAdamWConfig(AdamWConfig):
    """`AdamWConfig` plus torch's `fused` switch.

    The fused kernel updates each parameter in one pass instead of one pass per arithmetic op; on
    CPU, where torch's default is the per-tensor loop, it makes the optimizer step several times
    faster (`bench/throughput.py` measures the effect on a whole training step). Registered under
    its own name so that a saved `train_config.json` reloads with the same optimizer.
    """

    fused: bool = True
