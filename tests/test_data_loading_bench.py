"""bench/data_loading.py: the reader change proposed in docs/upstream_dataset_reader.md returns
LeRobot's samples unchanged and decodes no image of the action rows; LeRobot's own reader, and the
row selection proposed for lerobot#2895, decode every image column of each action row (when a
LeRobot release stops doing so, the proposal and the bench have done their job and must be
updated)."""

import importlib.util
import sys
from pathlib import Path
from unittest import mock

import datasets
import pytest
import torch
from datasets.features.image import Image

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def data_loading():
    sys.path.insert(0, str(BENCH))  # the bench imports its neighbour `common`
    try:
        spec = importlib.util.spec_from_file_location("data_loading_bench", BENCH / "data_loading.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.fixture(scope="module")
def dataset(data_loading, tmp_path_factory):
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("touch_block") / "images"
    return data_loading.open_dataset(
        data_loading.write_dataset(root, episodes=2, seed=0, lossless_video=False)
    )


def action_query_decodes(dataset, index: int) -> int:
    """Image decodes made by the reader's action-chunk query of one sample."""
    decode_example, calls = Image.decode_example, []

    def counting(self, *args, **kwargs):
        calls.append(self)
        return decode_example(self, *args, **kwargs)

    reader = dataset.reader
    query_indices, _ = reader._get_query_indices(index, dataset.hf_dataset[index]["episode_index"].item())
    with mock.patch.object(Image, "decode_example", counting):
        reader._query_hf_dataset(query_indices)
    return len(calls)


def test_proposed_reader_returns_the_same_samples(data_loading, dataset):
    last = len(dataset) - 1  # its action chunk is padded past the episode's end
    indices = [0, 3, last]
    data_loading.check_same_samples(dataset, dataset, indices, query=data_loading.query_only_queried_columns)
    with data_loading.reader_query(data_loading.query_only_queried_columns):
        sample = dataset[last]
    assert sample["action"].shape == (data_loading.CHUNK_SIZE, 3)
    assert sample["action_is_pad"][1:].all()


def test_only_lerobots_reader_decodes_the_images_of_action_rows(data_loading, dataset):
    image_columns = len(dataset.meta.camera_keys)  # RGB and depth
    assert image_columns == 2
    assert action_query_decodes(dataset, 0) == image_columns * data_loading.CHUNK_SIZE
    with data_loading.reader_query(data_loading.query_only_queried_columns):
        assert action_query_decodes(dataset, 0) == 0


def test_selected_rows_return_the_same_samples_and_still_decode_the_images_of_action_rows(
    data_loading, dataset
):
    last = len(dataset) - 1
    data_loading.check_same_samples(dataset, dataset, [0, 3, last], query=data_loading.query_selected_rows)
    with data_loading.reader_query(data_loading.query_selected_rows):
        assert action_query_decodes(dataset, 0) == 2 * data_loading.CHUNK_SIZE


def test_profile_attributes_the_decodes_to_the_action_query(data_loading, dataset):
    profile = data_loading.profile_sample(dataset, [0, 1])
    assert profile["image_decodes_per_sample"] == {
        "current row": 2.0,
        "action-chunk query": 2.0 * data_loading.CHUNK_SIZE,
        "rest": 0.0,
    }
    assert set(profile["seconds_per_sample"]) == {"current row", "action-chunk query", "rest"}
    assert torch.tensor(list(profile["seconds_per_sample"].values())).ge(0).all()


def test_rgb_and_depth_video_decode_no_image_in_the_action_query_and_keep_depth_within_its_codes(
    data_loading, dataset, tmp_path
):
    root = data_loading.write_dataset(
        tmp_path / "all_video", episodes=2, seed=0, lossless_video=True, depth_video=True
    )
    all_video = data_loading.open_dataset(root)
    assert set(all_video.meta.video_keys) == set(dataset.meta.camera_keys)  # no image column left
    assert action_query_decodes(all_video, 0) == 0
    indices = [0, 5, len(dataset) - 1]
    error = data_loading.check_same_samples(
        dataset, all_video, indices, depth_tolerance=data_loading.DEPTH_VIDEO_TOLERANCE_M
    )
    assert 0 < error <= data_loading.DEPTH_VIDEO_TOLERANCE_M  # quantised, not lossless
    with pytest.raises(AssertionError, match="depth differs"):
        data_loading.check_same_samples(dataset, all_video, indices, depth_tolerance=error / 2)
