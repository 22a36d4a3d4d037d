"""Monocular depth for robots that record none (geometry="estimator").

Wraps a depth-estimation model that transformers loads natively (`AutoModelForDepthEstimation`,
e.g. Depth Anything, DPT, ZoeDepth), frozen. Use a METRIC checkpoint (one that predicts metres):
relative-depth models give points in an arbitrary scale. Its weights are saved with the policy, so
a checkpoint is self-contained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoModelForDepthEstimation


class MonocularDepthEstimator(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> metric depth (B, 1, h, w) on the model's input grid."""

    def __init__(self, name: str):
        super().__init__()
        processor = AutoImageProcessor.from_pretrained(name)
        self.model = AutoModelForDepthEstimation.from_pretrained(name).eval().requires_grad_(False)
        size = processor.size  # a SizeDict: height/width, or shortest_edge for square resizes
        height = getattr(size, "height", None) or size.shortest_edge
        width = getattr(size, "width", None) or size.shortest_edge
        self.input_size = (height, width)
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> MonocularDepthEstimator:
        # Frozen: stays in eval mode whatever the policy does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, intrinsics: Tensor) -> tuple[Tensor, Tensor]:
        """-> depth (B, 1, h, w) metres and the intrinsics (B, 3, 3) rescaled to that (h, w) grid."""
        height, width = images.shape[-2:]
        pixels = F.interpolate(images.float(), size=self.input_size, mode="bilinear", align_corners=False)
        dtype = next(self.model.parameters()).dtype
        depth = self.model(pixel_values=((pixels - self.mean) / self.std).to(dtype)).predicted_depth
        depth = depth.float().unsqueeze(1)  # (B, 1, h, w)
        scale_x, scale_y = depth.shape[-1] / width, depth.shape[-2] / height
        # Pixel centres at integer coordinates: u' = (u + 0.5) * s - 0.5.
        scale = torch.tensor(
            [[scale_x, 0.0, 0.5 * scale_x - 0.5], [0.0, scale_y, 0.5 * scale_y - 0.5], [0, 0, 1]],
            device=intrinsics.device,
            dtype=intrinsics.dtype,
        )
        return depth, scale @ intrinsics
