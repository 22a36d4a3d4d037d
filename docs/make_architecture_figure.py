"""Draws docs/architecture.png: the prefix, the suffix and their fusion at every layer.

    .venv/bin/python docs/make_architecture_figure.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUTPUT = Path(__file__).with_name("architecture.png")
PREFIX_COLOUR = "#cfe2f3"
GEOMETRY_COLOUR = "#f9cb9c"
SUFFIX_COLOUR = "#d9ead3"
JOINT_COLOUR = "#fff2cc"


def box(axes, x, y, width, height, text, colour, fontsize=9, weight="normal"):
    """A rounded box with centred text; (x, y) is its lower-left corner."""
    axes.add_patch(
        FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.02,rounding_size=0.08",
                       facecolor=colour, edgecolor="#444444", linewidth=1.0)
    )
    axes.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=fontsize, weight=weight)


def arrow(axes, start, end, style="-|>", colour="#333333"):
    axes.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, linewidth=1.2))


def draw() -> None:
    figure, axes = plt.subplots(figsize=(12, 6.6))
    axes.set_xlim(0, 12)
    axes.set_ylim(0, 6.6)
    axes.axis("off")

    # Prefix: what the robot sees and is told.
    axes.text(1.6, 6.35, "prefix (computed once per chunk)", ha="center", fontsize=10, weight="bold")
    box(axes, 0.1, 4.9, 1.4, 0.7, "camera images\n(any number)", PREFIX_COLOUR)
    box(axes, 1.7, 4.9, 1.4, 0.7, "depth +\nintrinsics", GEOMETRY_COLOUR)
    box(axes, 0.1, 3.9, 1.4, 0.7, "vision tower\n+ projector", PREFIX_COLOUR)
    box(axes, 1.7, 3.9, 1.4, 0.7, "3D point per patch\n-> encoding x gate", GEOMETRY_COLOUR, fontsize=8)
    box(axes, 0.1, 2.9, 3.0, 0.7, "image patch tokens (+ 3D)   task tokens", PREFIX_COLOUR)
    arrow(axes, (0.8, 4.9), (0.8, 4.6))
    arrow(axes, (2.4, 4.9), (2.4, 4.6))
    arrow(axes, (0.8, 3.9), (0.8, 3.6))
    arrow(axes, (2.4, 3.9), (1.6, 3.6))
    axes.text(1.6, 2.55, "bidirectional among themselves;\nnever see the suffix", ha="center", fontsize=8, style="italic")

    # Suffix: what the action expert denoises.
    axes.text(1.6, 1.95, "suffix (every Euler step)", ha="center", fontsize=10, weight="bold")
    box(axes, 0.1, 0.9, 3.0, 0.8, "[state]  [H noisy actions x_t]  [time t]", SUFFIX_COLOUR)
    axes.text(1.6, 0.5, "sees the whole prefix and itself", ha="center", fontsize=8, style="italic")

    # Deep fusion: one joint attention per layer over both streams.
    axes.text(6.6, 6.35, "deep fusion: every transformer layer", ha="center", fontsize=10, weight="bold")
    for y in (4.3, 2.6):
        box(axes, 4.2, y + 0.75, 1.7, 0.55, "VLM layer: norm,\nq / k / v", PREFIX_COLOUR, fontsize=8)
        box(axes, 7.3, y + 0.75, 1.7, 0.55, "expert layer: norm,\nq / k / v", SUFFIX_COLOUR, fontsize=8)
        box(axes, 4.2, y, 4.8, 0.55, "ONE joint attention over [prefix ; suffix] (shared RoPE positions)",
            JOINT_COLOUR, fontsize=8, weight="bold")
        arrow(axes, (5.05, y + 0.75), (5.05, y + 0.55))
        arrow(axes, (8.15, y + 0.75), (8.15, y + 0.55))
    # From layer 1 to layer N: each stream applies its own o_proj, residual, norm and MLP.
    arrow(axes, (5.05, 4.3), (5.05, 3.9))
    arrow(axes, (8.15, 4.3), (8.15, 3.9))
    axes.text(6.6, 4.0, "o_proj + MLP per stream\n... x N layers", ha="center", fontsize=8)
    arrow(axes, (3.1, 3.25), (4.2, 5.3))
    # The suffix enters the expert stream of layer 1 (drawn around the layers).
    axes.plot([3.1, 3.75, 3.75, 8.15], [1.3, 1.3, 6.05, 6.05], color="#333333", linewidth=1.2)
    arrow(axes, (8.15, 6.05), (8.15, 5.6))
    box(axes, 4.2, 0.9, 4.8, 0.8,
        'expert_mode = "separate": a narrower expert stack\n"shared": the VLM\'s own layer weights',
        "#eeeeee", fontsize=8)

    # Output: velocity -> flow matching -> action chunk.
    axes.text(10.7, 4.0, "prefix keys/values cached\nand reused at every step", ha="center", fontsize=8,
              style="italic")
    box(axes, 9.6, 2.5, 2.2, 0.8, "action positions\n-> Linear = velocity v", SUFFIX_COLOUR)
    box(axes, 9.6, 1.3, 2.2, 0.9, "flow matching\ntraining: MSE(v, noise - a)\ninference: Euler steps",
        SUFFIX_COLOUR, fontsize=8)
    box(axes, 9.6, 0.15, 2.2, 0.8, "action chunk\n(H actions)", SUFFIX_COLOUR, weight="bold")
    arrow(axes, (9.0, 2.87), (9.6, 2.9))
    arrow(axes, (10.7, 2.5), (10.7, 2.2))
    arrow(axes, (10.7, 1.3), (10.7, 0.95))

    figure.tight_layout()
    figure.savefig(OUTPUT, dpi=130)
    print(OUTPUT)


if __name__ == "__main__":
    draw()
