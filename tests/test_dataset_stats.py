"""Camera-matrix stats of the package's datasets: valid for LeRobot under LIBERO's camera names."""

import numpy as np
import pytest
from lerobot.datasets import LeRobotDataset, aggregate_stats

from lerobot_llava3d_fusion.tools.dataset_stats import save_episode

# LeRobot's LIBERO camera names contain "image", which its stats checks take for a camera.
MATRICES = {"observation.intrinsics.image": (3, 3), "observation.extrinsics.image2": (4, 4)}
FEATURES = {
    **{
        key: {"dtype": "float32", "shape": shape, "names": ["rows", "cols"]}
        for key, shape in MATRICES.items()
    },
    "action": {"dtype": "float32", "shape": (2,), "names": None},
}
REPO_ID = "local/camera_matrices"


def record(dataset: LeRobotDataset, lengths: list[int], rng: np.random.Generator) -> dict[str, list]:
    """Episodes of random frames saved with `save_episode`; returns every value written, per key."""
    written: dict[str, list] = {key: [] for key in FEATURES}
    for length in lengths:
        for _ in range(length):
            frame = {key: rng.normal(size=ft["shape"]).astype(np.float32) for key, ft in FEATURES.items()}
            dataset.add_frame({**frame, "task": "look"})
            for key, value in frame.items():
                written[key].append(value)
        save_episode(dataset)
    return written


def assert_stats_describe(stats: dict, written: dict[str, list], copies: int = 1) -> None:
    """`stats` are those of `copies` times the `written` values."""
    for key in MATRICES:
        values = np.stack(written[key])
        assert stats[key]["mean"].shape == (1, 1, 1), key  # one channel, valid under any camera name
        np.testing.assert_allclose(
            [stats[key][name].item() for name in ("min", "max", "mean", "std")],
            [values.min(), values.max(), values.mean(), values.std()],
            rtol=1e-5,
            atol=1e-6,
            err_msg=key,
        )
        assert stats[key]["count"].tolist() == [copies * len(values)], key
    actions = np.stack(written["action"])  # other features keep LeRobot's own stats
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["action"]["std"], actions.std(axis=0), rtol=1e-5, atol=1e-6)


def test_episodes_with_image_named_camera_matrices_save_resume_and_aggregate(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "dataset"
    dataset = LeRobotDataset.create(REPO_ID, fps=10, features=FEATURES, root=root, use_videos=False)
    written = record(dataset, [3, 2, 4], rng)
    dataset.finalize()

    loaded = LeRobotDataset(REPO_ID, root=root)
    assert loaded.meta.total_episodes == 3
    assert_stats_describe(loaded.meta.stats, written)
    # What training on several datasets (and merging them) does with the stats: LeRobot's checks pass.
    both = aggregate_stats([loaded.meta.stats, loaded.meta.stats])
    assert_stats_describe(both, written, copies=2)

    resumed = LeRobotDataset.resume(REPO_ID, root=root)
    more = record(resumed, [2], rng)
    resumed.finalize()
    assert_stats_describe(
        LeRobotDataset(REPO_ID, root=root).meta.stats, {key: written[key] + more[key] for key in FEATURES}
    )


def test_a_failed_save_leaves_the_dataset_stats_in_place(tmp_path):
    dataset = LeRobotDataset.create(REPO_ID, fps=10, features=FEATURES, root=tmp_path / "d", use_videos=False)
    record(dataset, [2], np.random.default_rng(1))
    stats = dataset.meta.stats
    with pytest.raises(ValueError):
        save_episode(dataset)  # no frame added: LeRobot refuses the episode
    assert dataset.meta.stats is stats
    dataset.finalize()
