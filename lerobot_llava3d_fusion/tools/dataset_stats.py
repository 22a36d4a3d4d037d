"""Saving dataset episodes whose camera matrices LeRobot's stats checks would reject.

LeRobot 0.6.1 computes the stats of a float feature per last axis, so ``observation.intrinsics.<cam>``
(3, 3) gets stats shaped (3,) and ``observation.extrinsics.<cam>`` (4, 4) shaped (4,). Whenever it
aggregates stats (each saved episode from the second on, training on several datasets, merging
datasets) it also checks that every feature whose key contains "image" has camera-shaped stats,
(3, 1, 1) or (1, 1, 1). LeRobot's LIBERO cameras are named ``image`` and ``image2``, so saving the
second episode of a LIBERO RGB-D dataset fails in ``LeRobotDataset.save_episode``.

The policy never normalises camera matrices, so their stats only have to be valid. Every dataset
writer of this package saves its episodes with :func:`save_episode`: a camera matrix's stats are those
of all its entries taken as one channel, shaped (1, 1, 1), valid under any camera name. The per-episode
stats LeRobot keeps in ``meta/episodes`` are left as LeRobot computed them (it reads only the dataset's
``meta/stats.json`` when loading or aggregating datasets). Those are shaped (rows, cols) for a one-frame
episode, which LeRobot 0.6.1 then cannot store next to longer episodes: record at least two frames.
"""

from __future__ import annotations

import numpy as np
from lerobot.datasets import LeRobotDataset, aggregate_stats, write_stats

from lerobot_llava3d_fusion.observation_keys import is_camera_matrix_key


def one_channel_stats(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stats of a camera matrix feature, from LeRobot's per-column ones, with all entries as one channel.

    Args:
        stats: LeRobot's stats of a (rows, cols) float feature over an episode: ``min``, ``max``, ``mean``,
            ``std`` and quantiles ``q..`` shaped (cols,) (or (rows, cols) for a one-frame episode), ``count``
            (1,). Every column (entry) holds the same number of values.
    Returns:
        The same keys, shaped (1, 1, 1) (``count`` unchanged). ``min``, ``max``, ``mean`` and ``std`` are
        exact; a quantile is the mean of the columns' quantiles, as LeRobot averages quantiles over episodes.
    """
    mean = stats["mean"].mean()
    second_moment = (stats["std"] ** 2 + stats["mean"] ** 2).mean()
    channel = {
        "min": stats["min"].min(),
        "max": stats["max"].max(),
        "mean": mean,
        "std": np.sqrt(np.maximum(second_moment - mean**2, 0)),
        **{name: value.mean() for name, value in stats.items() if name[:1] == "q" and name[1:].isdigit()},
    }
    return {
        **{name: np.asarray(value).reshape(1, 1, 1) for name, value in channel.items()},
        "count": stats["count"],
    }


def save_episode(dataset: LeRobotDataset) -> None:
    """``dataset.save_episode()``, with the stats of its camera matrices as one channel.

    LeRobot merges an episode's stats into ``dataset.meta.stats`` only when the dataset already has stats
    (a new dataset takes its first episode's stats as they are). So the dataset's stats are set aside while
    LeRobot saves the episode; the episode's stats, camera matrices made one channel, are then merged
    with LeRobot's own ``aggregate_stats`` and written to ``meta/stats.json``.
    """
    dataset_stats = dataset.meta.stats
    dataset.meta.stats = None
    try:
        dataset.save_episode()
    except BaseException:
        dataset.meta.stats = dataset_stats
        raise
    episode_stats = {
        key: one_channel_stats(stats) if is_camera_matrix_key(key) else stats
        for key, stats in dataset.meta.stats.items()
    }
    dataset.meta.stats = (
        episode_stats if dataset_stats is None else aggregate_stats([dataset_stats, episode_stats])
    )
    write_stats(dataset.meta.stats, dataset.root)
