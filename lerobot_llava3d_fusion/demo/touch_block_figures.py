"""The demo's figures, written next to its results.json.

- `success.png`: the success rate of every evaluated policy and scripted reference, one bar each.
- `side_view.png`: one episode seen from the side, for each trained policy and the expert with and
  without depth: the end-effector's height against the named block's top over time (what depth
  buys: without it the height of the top is a guess) and its x/y distance to the top-centre, with
  the success radius.

They need matplotlib (`pip install "lerobot_policy_llava3d_fusion[demo]"`); without it the demo
logs that and writes its results only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lerobot_llava3d_fusion.demo.touch_block_outcomes import EpisodeTrace

logger = logging.getLogger(__name__)

SUCCESS_FIGURE = "success.png"
SIDE_VIEW_FIGURE = "side_view.png"
REFERENCE_COLOUR = "0.6"  # grey: the scripted references
POLICY_COLOUR = "tab:blue"


def write_demo_figures(
    run_dir: Path,
    success_rates: dict[str, float],
    reference_names: tuple[str, ...],
    traces: list[EpisodeTrace],
    success_radius: float,
) -> list[Path]:
    """Write `SUCCESS_FIGURE` and `SIDE_VIEW_FIGURE` into `run_dir`; their paths (none without
    matplotlib). `reference_names`: which of `success_rates` are scripted references."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            "matplotlib is not installed: no figures (pip install \"lerobot_policy_llava3d_fusion[demo]\")"
        )
        return []
    paths = [run_dir / SUCCESS_FIGURE, run_dir / SIDE_VIEW_FIGURE]
    success_figure = Figure(figsize=(8, 0.45 * len(success_rates) + 1.2))
    plot_success_rates(success_figure, success_rates, reference_names).savefig(paths[0], dpi=120)
    plot_side_view(Figure(figsize=(9, 6)), traces, success_radius).savefig(paths[1], dpi=120)
    return paths


def plot_success_rates(figure, success_rates: dict[str, float], reference_names: tuple[str, ...]):
    """Horizontal bars, top to bottom in the order of `success_rates`, each labelled with its rate."""
    axes = figure.subplots()
    names = list(success_rates)
    rates = [success_rates[name] for name in names]
    colours = [REFERENCE_COLOUR if name in reference_names else POLICY_COLOUR for name in names]
    positions = range(len(names))
    axes.barh(positions, rates, color=colours)
    labels = [f"{name} (reference)" if name in reference_names else name for name in names]
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()
    for position, rate in zip(positions, rates, strict=True):
        axes.text(rate + 1, position, f"{rate:.1f} %", va="center")
    axes.set_xlim(0, 118)  # room for the labels of full bars
    axes.set_xlabel("success (%)")
    axes.set_title("touch_block: success per policy")
    figure.tight_layout()
    return figure


def plot_side_view(figure, traces: list[EpisodeTrace], success_radius: float):
    """Two panels over the steps of one episode: the end-effector's height with the named block's top
    (and the band within the success radius), and its x/y distance to the top-centre."""
    height_axes, distance_axes = figure.subplots(2, 1, sharex=True)
    top_z = traces[0].target_top_z  # the same episode (seed) for every trace
    height_axes.axhspan(top_z - success_radius, top_z + success_radius, color="tab:green", alpha=0.15)
    height_axes.axhline(top_z, color="black", linestyle="--", label="named block's top")
    distance_axes.axhspan(0, success_radius, color="tab:green", alpha=0.15, label="within the success radius")
    for trace in traces:
        label = f"{trace.label}: {'success' if trace.success else 'failure'}"
        steps = range(len(trace.ee_z))
        height_axes.plot(steps, trace.ee_z, label=label)
        distance_axes.plot(steps, trace.xy_error, label=label)
    height_axes.set_ylabel("end-effector height (m)")
    height_axes.set_title("one episode from the side")
    height_axes.legend(fontsize="small", loc="best")
    distance_axes.set_ylabel("x/y distance to the top (m)")
    distance_axes.set_xlabel("step")
    distance_axes.legend(fontsize="small", loc="best")
    figure.tight_layout()
    return figure
