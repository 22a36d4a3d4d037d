"""Convert LIBERO's official HDF5 demonstrations into an RGB-D LeRobotDataset.

    llava3d-fusion-convert-libero --hdf5 LIBERO/libero/datasets/libero_spatial \\
        --repo-id local/libero_spatial_rgbd --root data/libero_spatial_rgbd

(or ``python -m lerobot_llava3d_fusion.tools.convert_libero ...``). Every ``*_demo.hdf5`` file holds
the demonstrations of one task, in the layout of LIBERO's downloader: a ``data`` group whose attrs
hold ``env_args`` (JSON), ``problem_info`` (JSON with ``language_instruction``) and
``bddl_file_name``; per demo ``data/demo_<i>/actions`` (T, 7) and ``data/demo_<i>/states`` (T, n),
the flattened MuJoCo state before each action, and attr ``model_file`` (the demo's MuJoCo model,
whose fixtures are placed differently in each demo); ``obs/*``, ``rewards`` and ``dones`` are not
needed: the converter renders every frame itself.

For every demo the task's env is built from its BDDL file (the installed LIBERO suite task of that
name) as ``LiberoRGBDEnv`` (:mod:`.libero_rgbd_sim`), and frame ``t`` is:

- ``--replay states`` (default): the recorded state ``t`` restored exactly (no drift), rendered;
- ``--replay actions``: the env set to the first recorded state, then the recorded actions stepped;
  the frame is the observation before action ``t``. A replay succeeds when the task's success
  predicate holds at some step; failed replays are dropped unless ``--keep-failed``.

Each frame goes through the same ``preprocess_observation`` and env processors as in
``lerobot-eval --env.type=libero_rgbd``, so the dataset has the feature names and conventions of
LeRobot's LIBERO datasets and env (``observation.images.image`` agent view and
``observation.images.image2`` wrist, rotated 180 degrees from robosuite's buffer; 8-d
``observation.state``; 7-d ``action``; the task string) plus, per camera, ``observation.depth.<cam>``
(LeRobot depth-map image, float32 metres, lossless), ``observation.intrinsics.<cam>`` (3, 3) and
``observation.extrinsics.<cam>`` (4, 4, camera-to-world). ``action[t]`` is the recorded action.

``--drop-noops`` removes the no-op actions the OpenVLA/pi0 LIBERO recipe removes (translation and
rotation norm below 1e-4 and the gripper command unchanged); with ``--replay actions`` they are not
executed either, as in that recipe. LeRobot's LIBERO datasets were made that way (actions replayed,
no-ops and failures dropped, 256 x 256).

Resumable, and safe to kill at any point (Ctrl-C, ``kill -9``, a crash): every episode is complete on
disk (its own data and ``meta/episodes`` parquet files, footers written) before the demo is listed in
the journal ``<root>/meta/libero_conversion.json``, which is replaced atomically and also keeps the
dataset's ``info.json``, ``stats.json`` and tasks as they were after that episode. Running the same
command again (the settings must be the same) removes what an unfinished episode left, restores those
files, skips the listed demos and appends the rest; only local files are read, never the Hub.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m` runs this file as `__main__`: hand over to the package's copy of the module, which
    # imports (and so registers) the env types only once.
    from lerobot_llava3d_fusion.tools.convert_libero import main

    raise SystemExit(main())

import argparse
import atexit
import json
import logging
import multiprocessing
import os
import shutil
import signal
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lerobot.datasets.io_utils import write_tasks
from lerobot.datasets.utils import (
    DEFAULT_EPISODES_PATH,
    DEFAULT_TASKS_PATH,
    EPISODES_DIR,
    INFO_PATH,
    STATS_PATH,
)
from lerobot.utils.io_utils import write_json

from lerobot_llava3d_fusion.envs.libero_rgbd import LiberoRGBDEnvConfig
from lerobot_llava3d_fusion.envs.libero_rgbd_sim import libero_rgbd_env_class, libero_suite
from lerobot_llava3d_fusion.tools.dataset_stats import save_episode
from lerobot_llava3d_fusion.tools.libero_rgbd_dataset import dataset_features, frame_from_batch
from lerobot_llava3d_fusion.tools.libero_setup import ensure_libero_ready

logger = logging.getLogger(__name__)

REPLAY_MODES = ("states", "actions")
# Attributes of the `data` group and datasets of each demo the converter reads.
FILE_ATTRS = ("env_args", "problem_info", "bddl_file_name")
DEMO_KEYS = ("actions", "states")
# The progress journal: the converted demos, the files of their episodes and the dataset-wide metadata
# after the last complete episode (replaced atomically after each demo).
JOURNAL = "meta/libero_conversion.json"
LEGACY_CONVERSION_LOG = "meta/libero_conversion.jsonl"  # earlier versions' log (not resumable)
NOOP_THRESHOLD = 1e-4  # the OpenVLA/pi0 recipe's threshold on the 6-d arm command
FPS = 10  # what LeRobot's LIBERO datasets declare (the simulator's control rate is 20 Hz)


class LiberoHDF5Error(ValueError):
    """An HDF5 file that is not in LIBERO's demonstration layout."""


# ---- Reading LIBERO's files -------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoJob:
    """One demonstration to convert (picklable: sent to worker processes)."""

    hdf5: str
    demo: str  # e.g. "demo_0"
    suite: str
    task_id: int
    task: str  # the language instruction
    size: int
    replay: str
    drop_noops: bool


def _demo_sort_key(name: str) -> tuple[int, str]:
    suffix = name.removeprefix("demo_")
    return (int(suffix), name) if suffix.isdigit() else (1 << 30, name)


def find_hdf5_files(paths: Sequence[str | Path]) -> list[Path]:
    """The ``.hdf5`` files among ``paths``; folders are searched recursively (sorted, deduplicated)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob("*.hdf5"))
            if not found:
                raise FileNotFoundError(f"no .hdf5 file under {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return list(dict.fromkeys(p.resolve() for p in files))


def _bddl_task(bddl_file_name: str, hdf5: Path) -> tuple[str, int]:
    """(suite, task id) of the installed LIBERO task whose BDDL file has this name.

    LIBERO's files store the BDDL path of the machine they were made on (``.../bddl_files/<suite>/
    <task>.bddl``); the task is found by folder and file name among the installed suites.
    """
    ensure_libero_ready()  # the libero import reads its config (and prompts on stdin without one)
    from libero.libero import benchmark

    path = Path(str(bddl_file_name).replace("\\", "/"))
    names = list(benchmark.get_benchmark_dict())
    # The suite named by the path's folder first (libero_90/libero_10 tasks also live in libero_100).
    order = sorted(names, key=lambda name: (name != path.parent.name, name == "libero_100", name))
    for suite_name in order:
        try:
            suite = libero_suite(suite_name)
        except Exception as err:  # noqa: BLE001 - a suite LIBERO lists but cannot build is not a candidate
            logger.debug("LIBERO suite %s cannot be built (%s); not searched", suite_name, err)
            continue
        for task_id, task in enumerate(suite.tasks):
            if task.bddl_file == path.name:
                return suite_name, task_id
    raise LiberoHDF5Error(
        f"{hdf5}: its BDDL file {bddl_file_name!r} is no task of the installed LIBERO suites ({', '.join(names)})."
    )


def read_demo_jobs(hdf5: Path, size: int, replay: str, drop_noops: bool) -> list[DemoJob]:
    """Check ``hdf5`` has LIBERO's layout and list its demos as jobs.

    Raises:
        LiberoHDF5Error: naming the missing group, attribute or dataset.
    """
    import h5py

    try:
        handle = h5py.File(hdf5, "r")
    except OSError as err:
        raise LiberoHDF5Error(f"{hdf5}: not a readable HDF5 file ({err})") from err
    with handle:
        if "data" not in handle:
            raise LiberoHDF5Error(
                f"{hdf5}: missing group 'data' (top-level keys: {sorted(handle)}); not a LIBERO "
                "demonstration file (<suite>/<task>_demo.hdf5 from LIBERO's downloader)."
            )
        data = handle["data"]
        for attr in FILE_ATTRS:
            if attr not in data.attrs:
                raise LiberoHDF5Error(
                    f"{hdf5}: missing attribute 'data.attrs[{attr!r}]' (present: {sorted(data.attrs)}); "
                    "not a LIBERO demonstration file."
                )
        try:
            problem_info = json.loads(data.attrs["problem_info"])
            json.loads(data.attrs["env_args"])
        except (TypeError, json.JSONDecodeError) as err:
            raise LiberoHDF5Error(
                f"{hdf5}: data.attrs['problem_info'/'env_args'] is not JSON ({err})"
            ) from err
        task = problem_info.get("language_instruction")
        if not isinstance(task, str) or not task.strip():
            raise LiberoHDF5Error(
                f"{hdf5}: missing key 'language_instruction' in data.attrs['problem_info'] "
                f"(keys: {sorted(problem_info)})."
            )
        demos = sorted((name for name in data if name.startswith("demo_")), key=_demo_sort_key)
        if not demos:
            raise LiberoHDF5Error(f"{hdf5}: no 'data/demo_<i>' group (keys of 'data': {sorted(data)}).")
        for demo in demos:
            for key in DEMO_KEYS:
                if key not in data[demo]:
                    raise LiberoHDF5Error(
                        f"{hdf5}: missing dataset 'data/{demo}/{key}' (keys: {sorted(data[demo])})."
                    )
            actions, states = data[demo]["actions"], data[demo]["states"]
            if actions.ndim != 2 or actions.shape[1] != 7:
                raise LiberoHDF5Error(
                    f"{hdf5}: data/{demo}/actions has shape {actions.shape}, expected (T, 7)"
                )
            if states.ndim != 2 or states.shape[0] != actions.shape[0]:
                raise LiberoHDF5Error(
                    f"{hdf5}: data/{demo}/states has shape {states.shape}, expected ({actions.shape[0]}, n): "
                    "one flattened MuJoCo state per action."
                )
        bddl_file_name = str(data.attrs["bddl_file_name"])
    suite, task_id = _bddl_task(bddl_file_name, hdf5)
    return [
        DemoJob(str(hdf5), demo, suite, task_id, task.strip(), size, replay, drop_noops) for demo in demos
    ]


def noop_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """(T,) bool: the OpenVLA/pi0 recipe's no-ops.

    An action is a no-op when its arm command (first 6 numbers) has norm below ``threshold`` and its
    gripper command equals the previous KEPT action's (the first action: arm command only).
    """
    mask = np.zeros(len(actions), dtype=bool)
    previous = None
    for t, action in enumerate(actions):
        still = np.linalg.norm(action[:-1]) < threshold
        if still and (previous is None or action[-1] == previous[-1]):
            mask[t] = True
        else:
            previous = action
    return mask


# ---- Rendering one demo (in a worker process or inline) ---------------------------------------------


@dataclass
class DemoResult:
    job: DemoJob
    frames: list[dict[str, Any]] = field(default_factory=list)
    recorded_steps: int = 0
    noops: int = 0
    success: bool | None = None  # replay of actions only


_WORKER_ENV: dict[str, Any] = {}  # the one live env of this process: {"key": ..., "env": ...}


def _env_for(job: DemoJob):
    """The process's env for the job's task (built once per task; the previous one is closed first,
    since robosuite renders with the EGL context made current last)."""
    key = (job.suite, job.task_id, job.size)
    if _WORKER_ENV.get("key") == key:
        return _WORKER_ENV["env"]
    close_worker_env()
    env = libero_rgbd_env_class()(
        task_suite=libero_suite(job.suite),
        task_id=job.task_id,
        task_suite_name=job.suite,
        obs_type="pixels_agent_pos",
        observation_height=job.size,
        observation_width=job.size,
        init_states=False,  # the demos carry their own states
    )
    env._ensure_env()
    if not _WORKER_ENV.get("closes_at_exit"):
        # Registered after robosuite's own exit handlers, so it runs before them: the env's EGL
        # contexts are freed while EGL is still up (worker processes end through interpreter exit).
        atexit.register(close_worker_env)
    _WORKER_ENV.update(key=key, env=env, preprocessor=_env_preprocessor(), closes_at_exit=True)
    return env


def close_worker_env() -> None:
    env = _WORKER_ENV.pop("env", None)
    for key in ("key", "preprocessor"):
        _WORKER_ENV.pop(key, None)
    if env is not None:
        env.close()


def _env_preprocessor():
    return LiberoRGBDEnvConfig().get_env_processors()[0]


def _batched(tree: Any) -> Any:
    """Add the leading batch dim a vector env would add to every array of a (nested) observation."""
    if isinstance(tree, dict):
        return {key: _batched(value) for key, value in tree.items()}
    return np.asarray(tree)[None]


def _frame(env, raw_obs: dict, action: np.ndarray, job: DemoJob, features: dict) -> dict[str, Any]:
    from lerobot.envs.utils import preprocess_observation

    batch = preprocess_observation(_batched(env._format_raw_obs(raw_obs)))
    batch["task"] = [job.task]
    batch = _WORKER_ENV["preprocessor"](batch)
    return frame_from_batch(batch, features, action.astype(np.float32), job.task)


def localize_model_xml(xml: str) -> str:
    """Point the asset files of a recorded MuJoCo model at this machine's LIBERO and robosuite.

    LIBERO stores each demo's model (``data/demo_<i>`` attr ``model_file``) with the absolute asset
    paths of the machine that recorded it: ``.../libero/libero/assets/<rest>`` and
    ``.../robosuite/models/assets/<rest>`` become the installed folders + ``<rest>``.

    Raises:
        FileNotFoundError: naming an asset that is not installed here.
    """
    import xml.etree.ElementTree as ET

    ensure_libero_ready()  # before robosuite (reads MUJOCO_GL) and libero (reads its config, else prompts)
    import robosuite
    from libero.libero import get_libero_path

    roots = {
        "libero": Path(get_libero_path("assets")),
        "robosuite": Path(robosuite.__file__).parent / "models" / "assets",
    }
    tree = ET.fromstring(xml)
    for element in tree.iter():
        path = element.get("file")
        if not path:
            continue
        parts = Path(path.replace("\\", "/")).parts
        # The last "assets" folder right under "libero" (LIBERO) or "models" (robosuite).
        for index in range(len(parts) - 2, 0, -1):
            if parts[index] == "assets" and parts[index - 1] in ("libero", "models"):
                owner = "libero" if parts[index - 1] == "libero" else "robosuite"
                local = roots[owner].joinpath(*parts[index + 1 :])
                break
        else:
            local = Path(path)
        if not local.exists():
            raise FileNotFoundError(
                f"asset {path!r} of the demo's recorded model is not installed here (looked for {local})"
            )
        element.set("file", str(local))
    return ET.tostring(tree, encoding="unicode")


def render_demo(job: DemoJob) -> DemoResult:
    """Render every kept frame of one demo (see the module docstring for the two replay modes).

    The scene is rebuilt from the demo's recorded MuJoCo model (attr ``model_file``) when the file
    has one, as LIBERO's own scripts do: fixtures (cabinets, stoves...) are placed in the model, not
    in the state, and a fresh reset would place them elsewhere.
    """
    import h5py

    features = dataset_features(LiberoRGBDEnvConfig(observation_height=job.size, observation_width=job.size))
    with h5py.File(job.hdf5, "r") as handle:
        group = handle["data"][job.demo]
        actions = np.asarray(group["actions"], dtype=np.float64)
        states = np.asarray(group["states"], dtype=np.float64)
        model_xml = group.attrs.get("model_file")
    env = _env_for(job)
    sim_env = env._env  # LIBERO's OffScreenRenderEnv
    if model_xml is not None:
        sim_env.reset_from_xml_string(localize_model_xml(str(model_xml)))
    else:
        logger.warning("%s %s has no model_file: fixtures are placed by a fresh reset", job.hdf5, job.demo)
        sim_env.reset()
    expected = sim_env.get_sim_state().shape[0]
    if states.shape[1] != expected:
        raise LiberoHDF5Error(
            f"{job.hdf5}: data/{job.demo}/states has {states.shape[1]} numbers per step, but the env of task "
            f"{job.suite}/{job.task_id} ({job.task!r}) has a MuJoCo state of {expected}: wrong task or LIBERO version."
        )
    drop = noop_mask(actions) if job.drop_noops else np.zeros(len(actions), dtype=bool)
    result = DemoResult(job, recorded_steps=len(actions), noops=int(drop.sum()))
    if job.replay == "states":
        for t in np.flatnonzero(~drop):
            raw_obs = sim_env.regenerate_obs_from_state(states[t])
            result.frames.append(_frame(env, raw_obs, actions[t], job, features))
    else:
        for robot in sim_env.robots:  # LeRobot's LIBERO env runs the delta (relative) controller
            robot.controller.use_delta = True
        raw_obs = sim_env.set_init_state(states[0])
        success = False
        for t in np.flatnonzero(~drop):
            result.frames.append(_frame(env, raw_obs, actions[t], job, features))
            raw_obs, _, _, _ = sim_env.step(actions[t].tolist())
            success = success or bool(sim_env.check_success())
        result.success = success
    return result


# ---- Writing the dataset ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a resumed conversion must share with the first run."""

    size: int
    replay: str
    drop_noops: bool
    keep_failed: bool
    fps: int


# Folders whose files belong to episodes (images are stored in the data files, there are no videos);
# every such file is listed by the journal entry of its demo.
EPISODE_FOLDERS = ("data", EPISODES_DIR)
# LeRobot's staging folder for the frames of the episode being written (emptied after each episode).
FRAME_STAGING = "images"


def _episode_files(root: Path) -> set[str]:
    """Paths (relative to ``root``) of the files under the episode folders."""
    return {
        path.relative_to(root).as_posix()
        for folder in EPISODE_FOLDERS
        if (root / folder).is_dir()
        for path in (root / folder).rglob("*")
        if path.is_file()
    }


def _read_journal(root: Path) -> dict | None:
    path = root / JOURNAL
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:  # written by os.replace: never half-written by a kill
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or use another --root.") from err


def _write_journal(root: Path, journal: dict) -> None:
    """Replace the journal atomically: a kill leaves the previous journal or this one, never a mix."""
    path = root / JOURNAL
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(journal))
    os.replace(staged, path)


def _dataset_snapshot(dataset) -> dict:
    """The dataset-wide metadata files as they are after the last complete episode."""
    root = Path(dataset.root)
    tasks = dataset.meta.tasks
    return {
        "info": json.loads((root / INFO_PATH).read_text()),
        "stats": json.loads((root / STATS_PATH).read_text()) if (root / STATS_PATH).is_file() else None,
        "tasks": [] if tasks is None else tasks.sort_values("task_index").index.tolist(),
    }


def _roll_back_to_journal(root: Path, journal: dict) -> None:
    """Bring ``root`` back to the last episode the journal lists as complete.

    A hard kill can leave the files of an unfinished episode (a data parquet without its footer, frames
    in LeRobot's staging folder, a ``meta/episodes`` file) and half-updated ``info.json``,
    ``stats.json`` and ``tasks.parquet``. Files no journal entry lists are deleted and the three
    metadata files rewritten from the journal's snapshot. Idempotent: a kill during it is repaired by
    the next run the same way.
    """
    committed = {file for entry in journal["demos"] for file in entry["files"]}
    stray = sorted(_episode_files(root) - committed)
    if stray:
        logger.info("Removing %d files of an episode the previous run did not finish: %s", len(stray), stray)
    for file in stray:
        (root / file).unlink()
    shutil.rmtree(root / FRAME_STAGING, ignore_errors=True)
    snapshot = journal["dataset"]
    write_json(snapshot["info"], root / INFO_PATH)
    (root / STATS_PATH).unlink(missing_ok=True)
    if snapshot["stats"] is not None:
        write_json(snapshot["stats"], root / STATS_PATH)
    (root / DEFAULT_TASKS_PATH).unlink(missing_ok=True)
    if snapshot["tasks"]:
        tasks = snapshot["tasks"]
        write_tasks(pd.DataFrame({"task_index": range(len(tasks))}, index=pd.Index(tasks, name="task")), root)


def _close_episode_files(dataset) -> list[str]:
    """Make the episode just saved complete on disk, and send the next one to new files.

    LeRobot keeps a dataset's data parquet and ``meta/episodes`` parquet open across episodes (and
    buffers episode metadata), writing their footers only in ``finalize()``. Here both are closed after
    every episode, and the writers are set up as ``LeRobotDataset.resume`` sets them up (continuing
    after the last episode, in new files) without reloading every episode's metadata.

    Returns:
        The episode's files (its data and ``meta/episodes`` parquet), relative to the dataset's root.
    """
    meta, writer = dataset.meta, dataset.writer
    writer.close_writer()
    meta._close_writer()  # flushes the buffered episode metadata first
    last = {key: value[0] for key, value in meta.latest_episode.items()}
    meta.episodes = [last]  # what the writers read to continue after the last episode
    meta.latest_episode = None
    writer._latest_episode = None
    return [
        meta.data_path.format(chunk_index=last["data/chunk_index"], file_index=last["data/file_index"]),
        DEFAULT_EPISODES_PATH.format(
            chunk_index=last["meta/episodes/chunk_index"], file_index=last["meta/episodes/file_index"]
        ),
    ]


def _open_dataset(repo_id: str, root: Path, settings: Settings):
    """Create the dataset, or reopen one this converter started (rolled back to its last complete
    episode, the settings checked); only local files are read."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    journal = _read_journal(root)
    if journal is not None:
        if journal["settings"] != asdict(settings):
            raise ValueError(
                f"{root} was converted with {journal['settings']}; this run asks for {asdict(settings)}. "
                "Use the same options to resume, or another --root."
            )
        _roll_back_to_journal(root, journal)
        logger.info("Resuming %s: %d demos already converted", root, len(journal["demos"]))
        return LeRobotDataset.resume(repo_id, root=root), journal
    if (root / LEGACY_CONVERSION_LOG).is_file():
        raise FileExistsError(
            f"{root} was written by an earlier version of this converter ({LEGACY_CONVERSION_LOG}, no "
            f"{JOURNAL}), which cannot be resumed: use it as it is if that run ended normally, or convert "
            "the remaining demos into another --root."
        )
    if (root / INFO_PATH).is_file():
        raise FileExistsError(
            f"{root} holds a dataset that this converter did not write (no {JOURNAL}); choose another --root."
        )
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no dataset; choose another --root.")
    # Created next to `root` and moved there once its journal exists, so a run killed while creating
    # leaves no half-made dataset at `root` (the next run starts this over).
    creating = root.with_name(f".{root.name}.creating")
    shutil.rmtree(creating, ignore_errors=True)
    features = dataset_features(
        LiberoRGBDEnvConfig(observation_height=settings.size, observation_width=settings.size)
    )
    dataset = LeRobotDataset.create(
        repo_id=repo_id, fps=settings.fps, features=features, root=creating, robot_type="panda",
        use_videos=False,
    )  # fmt: skip
    dataset.finalize()
    journal = {"settings": asdict(settings), "demos": [], "dataset": _dataset_snapshot(dataset)}
    _write_journal(creating, journal)
    os.replace(creating, root)  # replaces an empty folder too
    return LeRobotDataset.resume(repo_id, root=root), journal


def _results(jobs: Sequence[DemoJob], workers: int) -> Iterator[DemoResult]:
    """Results in job order; with workers > 1 rendered by a pool of spawned processes (each with its
    own EGL context), at most 2 demos per worker in flight to bound memory."""
    if workers <= 1:
        try:
            for job in jobs:
                yield render_demo(job)
        finally:
            close_worker_env()
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[Future] = deque()
        queue = iter(jobs)
        try:
            for job in queue:
                pending.append(pool.submit(render_demo, job))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


@dataclass
class ConversionSummary:
    demos: int = 0  # demos handled in this run
    episodes: int = 0  # episodes written in this run
    frames: int = 0
    noops: int = 0
    replays: int = 0
    successes: int = 0
    dropped_failed: int = 0
    skipped: int = 0  # already converted by an earlier run


def convert_libero(
    hdf5: Sequence[str | Path],
    repo_id: str,
    root: str | Path,
    image_size: int = 256,
    replay: str = "states",
    keep_failed: bool = False,
    drop_noops: bool = False,
    workers: int = 1,
    fps: int = FPS,
    max_demos: int | None = None,
) -> ConversionSummary:
    """Convert LIBERO HDF5 demonstration files into one RGB-D LeRobotDataset at ``root``.

    Args:
        hdf5: files and/or folders (searched recursively for ``*.hdf5``).
        repo_id: the dataset's id, e.g. ``local/libero_spatial_rgbd``.
        root: dataset folder; created, or resumed when a previous run of this converter left it.
        image_size: square resolution of both cameras' RGB and depth.
        replay: ``"states"`` (restore each recorded state) or ``"actions"`` (replay the actions).
        keep_failed: with ``replay="actions"``, also write demos whose replay does not succeed.
        drop_noops: drop no-op actions (the OpenVLA/pi0 LIBERO recipe).
        workers: processes rendering demos in parallel (1: in this process).
        max_demos: convert at most this many demos per file (a quick look); ``None``: all.
    Returns:
        Counts of this run (demos, episodes, frames, replay successes...).
    """
    from tqdm import tqdm

    if replay not in REPLAY_MODES:
        raise ValueError(f"replay must be one of {REPLAY_MODES}, got {replay!r}")
    if keep_failed and replay != "actions":
        raise ValueError("--keep-failed only applies to --replay actions (restored states cannot fail)")
    if image_size < 8 or workers < 1:
        raise ValueError(f"image_size must be >= 8 and workers >= 1 (got {image_size}, {workers})")
    if max_demos is not None and max_demos < 1:
        raise ValueError(f"max_demos must be >= 1, or None for every demo (got {max_demos})")
    ensure_libero_ready()
    root = Path(root)
    jobs = []
    for path in find_hdf5_files(hdf5):
        file_jobs = read_demo_jobs(path, image_size, replay, drop_noops)
        jobs.extend(file_jobs[:max_demos] if max_demos is not None else file_jobs)
    settings = Settings(image_size, replay, drop_noops, keep_failed, fps)
    dataset, journal = _open_dataset(repo_id, root, settings)
    done = {(entry["hdf5"], entry["demo"]) for entry in journal["demos"]}
    summary = ConversionSummary(skipped=sum((job.hdf5, job.demo) in done for job in jobs))
    todo = [job for job in jobs if (job.hdf5, job.demo) not in done]
    logger.info(
        "%d demos in %d files: %d to convert, %d already converted",
        len(jobs), len({job.hdf5 for job in jobs}), len(todo), summary.skipped,
    )  # fmt: skip
    try:
        with tqdm(total=len(todo), desc="Converting LIBERO demos", unit="demo") as bar:
            for result in _results(todo, workers):
                job, kept = result.job, bool(result.frames)
                summary.demos += 1
                summary.noops += result.noops
                if result.success is not None:
                    summary.replays += 1
                    summary.successes += result.success
                    if not result.success and not keep_failed:
                        kept = False
                        summary.dropped_failed += 1
                episode_index, files = None, []
                if kept:
                    for frame in result.frames:
                        dataset.add_frame(frame)
                    save_episode(dataset)
                    files = _close_episode_files(dataset)
                    episode_index = dataset.meta.total_episodes - 1
                    journal["dataset"] = _dataset_snapshot(dataset)
                    summary.episodes += 1
                    summary.frames += len(result.frames)
                journal["demos"].append(
                    {"hdf5": job.hdf5, "demo": job.demo, "task": job.task, "episode_index": episode_index,
                     "recorded_steps": result.recorded_steps, "frames": len(result.frames),
                     "noops": result.noops, "success": result.success, "files": files}
                )  # fmt: skip
                _write_journal(root, journal)  # the demo counts as converted from here on
                bar.update()
                bar.set_postfix(
                    episodes=summary.episodes,
                    **({"success": f"{summary.successes}/{summary.replays}"} if summary.replays else {}),
                )
    finally:
        dataset.finalize()
    return summary


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _demo_count(text: str) -> int | None:
    """``--max-demos``: a count >= 1, or ``all``."""
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'all', got {text!r}")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava3d-fusion-convert-libero",
        description="Convert LIBERO's HDF5 demonstrations into an RGB-D LeRobotDataset "
        "(RGB, metric depth and camera matrices of both cameras).",
    )
    parser.add_argument("--hdf5", nargs="+", required=True, help="*_demo.hdf5 files or folders of them")
    parser.add_argument("--repo-id", required=True, help="dataset id, e.g. local/libero_spatial_rgbd")
    parser.add_argument("--root", type=Path, required=True, help="dataset folder (created or resumed)")
    parser.add_argument("--image-size", type=int, default=256, help="square camera resolution (default 256)")
    parser.add_argument("--replay", choices=REPLAY_MODES, default="states",
                        help="restore the recorded states (default, exact) or replay the actions")  # fmt: skip
    parser.add_argument("--keep-failed", action="store_true", help="keep demos whose action replay fails")
    parser.add_argument("--drop-noops", action="store_true", help="drop no-op actions (OpenVLA/pi0 recipe)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    parser.add_argument("--fps", type=int, default=FPS, help=f"fps stored in the dataset (default {FPS})")
    parser.add_argument("--max-demos", type=_demo_count, default=None, metavar="N",
                        help="convert at most N demos per file (N >= 1; default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    # force: LeRobot's imports may already have configured the root logger, which would hide our summary.
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # finalize the dataset on `kill` too

    try:
        summary = convert_libero(
            args.hdf5, args.repo_id, args.root, image_size=args.image_size, replay=args.replay,
            keep_failed=args.keep_failed, drop_noops=args.drop_noops, workers=args.workers, fps=args.fps,
            max_demos=args.max_demos,
        )  # fmt: skip
    except (LiberoHDF5Error, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"error: {err}\n")
    if summary.replays:
        logger.info(
            "Action replay: %d of %d demos succeeded; %d failed demos %s",
            summary.successes, summary.replays, summary.replays - summary.successes,
            "kept" if args.keep_failed else "dropped",
        )  # fmt: skip
    logger.info(
        "Wrote %d episodes (%d frames, %d no-ops dropped) to %s; %d demos were already converted",
        summary.episodes, summary.frames, summary.noops if args.drop_noops else 0, args.root, summary.skipped,
    )  # fmt: skip
    return 0
