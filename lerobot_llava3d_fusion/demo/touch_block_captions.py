"""Image-text pairs rendered from touch_block scenes, for the VLM pretraining stage (`vlm_pretraining`).

They teach the backbone what the VLA's instruction refers to, before any action is seen: for every
block, both "where is the <colour> block" and the instruction itself ("touch the top of the <colour>
block") are answered with the block's image cell, "x <column> y <row>" on a `grid` x `grid` division
of the image; "where is the gripper" with the end-effector's cell; and "what colour is the block at
x <column> y <row>" with a colour word. Scenes hold a random number of blocks in `num_blocks` and
the end-effector anywhere in the workspace, so the pairs cover every layout the task shows.
"""

from __future__ import annotations

import numpy as np

from lerobot_llava3d_fusion.demo.vlm_pretraining import ImageTextPair
from lerobot_llava3d_fusion.envs import touch_block

WHERE_BLOCK = "where is the {colour} block"
WHERE_GRIPPER = "where is the gripper"
WHAT_COLOUR = "what colour is the block at {cell}"
DEFAULT_GRID = 16


def cell_words(pixel: np.ndarray, image_size: tuple[int, int], grid: int) -> str:
    """'x <column> y <row>' of the image cell holding `pixel` (u = column, v = row)."""
    height, width = image_size
    column = int(np.clip(pixel[0] * grid // width, 0, grid - 1))
    row = int(np.clip(pixel[1] * grid // height, 0, grid - 1))
    return f"x {column} y {row}"


def project(renderer: touch_block.TouchBlockRenderer, points: np.ndarray) -> np.ndarray:
    """(N, 3) world points -> (N, 2) pixel coordinates (u, v) of the renderer's camera."""
    extrinsics = renderer.extrinsics.astype(np.float64)
    camera = (points - extrinsics[:3, 3]) @ extrinsics[:3, :3]  # world -> camera frame
    pixels = camera @ renderer.intrinsics.astype(np.float64).T
    return pixels[:, :2] / pixels[:, 2:]


def caption_vocabulary(grid: int = DEFAULT_GRID) -> list[str]:
    """Every word the pairs (and the task's instructions) use."""
    templates = (WHERE_BLOCK, WHERE_GRIPPER, WHAT_COLOUR, touch_block.INSTRUCTION_TEMPLATE)
    words = {word for template in templates for word in template.format(colour="", cell="").split()}
    return sorted(words | set(touch_block.PALETTE) | {"x", "y"} | {str(i) for i in range(grid)})


def touch_block_image_text_pairs(
    num_images: int,
    seed: int = 0,
    num_blocks: tuple[int, int] = (1, len(touch_block.PALETTE)),
    image_size: tuple[int, int] = (64, 64),
    grid: int = DEFAULT_GRID,
) -> list[ImageTextPair]:
    """`num_images` random scenes, each with its questions (see the module docstring)."""
    low, high = num_blocks
    if not 1 <= low <= high <= len(touch_block.PALETTE):
        raise ValueError(
            f"num_blocks must be a range within [1, {len(touch_block.PALETTE)}], got {num_blocks}"
        )
    if grid < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    rng = np.random.default_rng(seed)
    renderer = touch_block.TouchBlockRenderer(*image_size)
    pairs: list[ImageTextPair] = []
    for _ in range(num_images):
        scene = touch_block.sample_scene(rng, int(rng.integers(low, high + 1)))
        extent = touch_block.BLOCK_CENTRE_EXTENT
        gripper = np.array([*rng.uniform(-extent, extent, size=2), rng.uniform(0.0, 0.3)])
        image, _ = renderer.render(scene, gripper)
        block_cells = [
            cell_words(p, image_size, grid) for p in project(renderer, renderer.block_top_centres(scene))
        ]
        for colour, cell in zip(scene.colours, block_cells, strict=True):
            pairs.append(ImageTextPair(image, WHERE_BLOCK.format(colour=colour), cell))
            pairs.append(ImageTextPair(image, touch_block.INSTRUCTION_TEMPLATE.format(colour=colour), cell))
        pairs.append(
            ImageTextPair(
                image, WHERE_GRIPPER, cell_words(project(renderer, gripper[None])[0], image_size, grid)
            )
        )
        asked = int(rng.integers(len(scene.colours)))
        pairs.append(ImageTextPair(image, WHAT_COLOUR.format(cell=block_cells[asked]), scene.colours[asked]))
    return pairs
