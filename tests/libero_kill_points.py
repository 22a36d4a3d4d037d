"""Run ``llava3d-fusion-convert-libero`` with fake rendering, SIGKILLing itself at a named point.

    python tests/libero_kill_points.py --kill-at data:2 -- --hdf5 ... --repo-id ... --root ...

``--kill-at NAME:N`` sends SIGKILL to this process on the N-th time the run reaches point NAME (no
``--kill-at``: the run completes). The points, in the order a demo passes them:

- ``create``: the new dataset was created (in its folder next to ``--root``), before its journal;
- ``frame``: a frame was added to the episode buffer (LeRobot staged its images);
- ``data``: LeRobot wrote the episode's rows to the data parquet, whose footer is not written yet;
- ``saved``: the episode is saved (``info.json`` and ``stats.json`` count it, its ``meta/episodes``
  row is still buffered);
- ``closed``: the episode's files are complete, the journal does not list it yet;
- ``journal``: the new journal is written next to the old one, not yet moved over it.

Rendering is replaced by :func:`fake_render` and the BDDL lookup by LIBERO's suite task of
:mod:`libero_hdf5`, so neither the simulator nor LIBERO is imported.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from libero_hdf5 import SUITE, TASK_ID  # noqa: E402

KILL_POINTS = ("create", "frame", "data", "saved", "closed", "journal")
FAKE_SIZE = 16  # --image-size of the fake frames


def fake_frames(values: list[float], task: str, size: int = FAKE_SIZE) -> list[dict]:
    """One frame per value, every feature of the converter's dataset filled with that value."""
    from lerobot_llava3d_fusion.envs.libero_rgbd import LiberoRGBDEnvConfig
    from lerobot_llava3d_fusion.tools.libero_rgbd_dataset import dataset_features

    features = dataset_features(LiberoRGBDEnvConfig(observation_height=size, observation_width=size))
    frames = []
    for value in values:
        frame = {"task": task}
        for key, feature in features.items():
            dtype = np.uint8 if feature["dtype"] == "image" and feature["shape"][-1] == 3 else np.float32
            frame[key] = np.full(feature["shape"], value, dtype=dtype)
        frames.append(frame)
    return frames


def fake_render(job):
    """Frames of ``demo_<i>``: 2 + i % 2 of them, valued 10 * i + t (t: the frame's index)."""
    from lerobot_llava3d_fusion.tools.convert_libero import DemoResult

    index = int(job.demo.removeprefix("demo_"))
    values = [10.0 * index + t for t in range(2 + index % 2)]
    return DemoResult(job, fake_frames(values, job.task, job.size), recorded_steps=len(values))


def use_fake_rendering(convert_libero_module, patch=setattr) -> None:
    """Replace rendering and the LIBERO task lookup in the converter module (``patch``: e.g.
    ``monkeypatch.setattr``)."""
    patch(convert_libero_module, "render_demo", fake_render)
    patch(convert_libero_module, "_bddl_task", lambda bddl_file_name, hdf5: (SUITE, TASK_ID))


def _kill_on(point: str, call: int):
    """A counter for each point; SIGKILL on the `call`-th hit of `point`."""
    hits = dict.fromkeys(KILL_POINTS, 0)

    def hit(name: str) -> None:
        hits[name] += 1
        if name == point and hits[name] == call:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def _install_kill_points(hit) -> None:
    from lerobot.datasets.dataset_writer import DatasetWriter
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_llava3d_fusion.tools import convert_libero

    def after(name, function):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            hit(name)
            return result

        return wrapped

    create = LeRobotDataset.create
    LeRobotDataset.create = classmethod(lambda cls, *args, **kwargs: after("create", create)(*args, **kwargs))
    DatasetWriter.add_frame = after("frame", DatasetWriter.add_frame)
    DatasetWriter._save_episode_data = after("data", DatasetWriter._save_episode_data)
    convert_libero.save_episode = after("saved", convert_libero.save_episode)
    convert_libero._close_episode_files = after("closed", convert_libero._close_episode_files)
    replace = os.replace

    def replace_journal_last(source, destination):
        if Path(destination).name == Path(convert_libero.JOURNAL).name:
            hit("journal")
        replace(source, destination)

    os.replace = replace_journal_last


def main(argv: list[str]) -> int:
    from lerobot_llava3d_fusion.tools import convert_libero

    kill_at = None
    if argv[:1] == ["--kill-at"]:
        kill_at, argv = argv[1], argv[2:]
    converter_args = argv[1:] if argv[:1] == ["--"] else argv
    use_fake_rendering(convert_libero)
    if kill_at is not None:
        point, _, call = kill_at.partition(":")
        assert point in KILL_POINTS, f"unknown kill point {point!r} (known: {KILL_POINTS})"
        _install_kill_points(_kill_on(point, int(call)))
    return convert_libero.main(converter_args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
