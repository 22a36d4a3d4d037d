"""Tests of ``llava3d-fusion-convert-libero`` (LIBERO HDF5 demonstrations -> RGB-D LeRobotDataset).

A small HDF5 file in the layout of LIBERO's downloads is written from the simulator here (two short
demos of libero_spatial task 0 at LIBERO's 128 px, with the recorded model's asset paths of another
machine), converted, and the dataset compared with what the simulator knew: frame counts, the stored
RGB of the same states, the 8-d state, and the plate's position from back-projected depth. The sim
part costs about 2 minutes on 2 cores; the writer logic and the error paths need no simulator.
The slow test trains on the converted dataset with lerobot-train and evaluates in libero_rgbd.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from libero_hdf5 import (  # noqa: E402
    FOREIGN_LIBERO_ASSETS,
    FOREIGN_ROBOSUITE_ASSETS,
    SUITE,
    TASK_ID,
    write_libero_hdf5,
)
from libero_kill_points import fake_frames, use_fake_rendering  # noqa: E402

from lerobot_llava3d_fusion.geometry.patch_points import backproject_depth  # noqa: E402
from lerobot_llava3d_fusion.tools import convert_libero  # noqa: E402
from lerobot_llava3d_fusion.tools.convert_libero import (  # noqa: E402
    JOURNAL,
    DemoResult,
    LiberoHDF5Error,
    localize_model_xml,
    noop_mask,
    read_demo_jobs,
)
from lerobot_llava3d_fusion.tools.libero_setup import ensure_libero_ready  # noqa: E402

convert = convert_libero.convert_libero  # the function (same name as its module)
SIZE = 128  # LIBERO's own files are 128 x 128
CAMERAS = {"image": "agentview_rgb", "image2": "eye_in_hand_rgb"}
REPO_ID = "local/libero_rgbd_converted"
TASK = "pick up the black bowl between the plate and the ramekin and place it on the plate"
STILL, OPEN = np.zeros(6), -1.0  # LIBERO: gripper -1 opens


def demo_actions() -> list[np.ndarray]:
    """demo_0: 6 steps, 2 of them no-ops (first: no motion; fourth: no motion, same gripper); demo_1: 4."""
    rng = np.random.default_rng(0)

    def move():
        return np.append(rng.normal(0.0, 0.3, 6) * [1, 1, 1, 0.2, 0.2, 0.2], OPEN)

    demo_0 = [np.append(STILL, OPEN), move(), move(), np.append(STILL, OPEN), move(), move()]
    return [np.array(demo_0), np.array([move() for _ in range(4)])]


def load(root: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(REPO_ID, root=root, depth_output_unit="m")


def project(point: torch.Tensor, intrinsics: torch.Tensor, cam_to_world: torch.Tensor) -> tuple[int, int]:
    """(row, col) of a world point in the image described by ``intrinsics`` / ``cam_to_world``."""
    world_to_cam = torch.linalg.inv(cam_to_world.double())
    u, v, w = intrinsics.double() @ (world_to_cam[:3, :3] @ point.double() + world_to_cam[:3, 3])
    return round((v / w).item()), round((u / w).item())


# ---- Fixtures (simulator) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def libero_file(tmp_path_factory) -> tuple[Path, dict]:
    ensure_libero_ready()
    path = tmp_path_factory.mktemp("libero") / SUITE / "pick_up_the_black_bowl_demo.hdf5"
    truth = write_libero_hdf5(path, demo_actions(), size=SIZE)
    return path, truth


@pytest.fixture(scope="module")
def converted(libero_file, tmp_path_factory) -> dict:
    """Restored states: first only demo_0 (--max-demos 1), then the same command again (resumes)."""
    path, truth = libero_file
    root = tmp_path_factory.mktemp("converted") / "dataset"
    first = convert([path.parent], REPO_ID, root, image_size=SIZE, max_demos=1)
    second = convert([path.parent], REPO_ID, root, image_size=SIZE)
    return {"root": root, "first": first, "second": second, "hdf5": path, "truth": truth}


# ---- No simulator --------------------------------------------------------------------------------


def test_noop_mask_follows_the_openvla_recipe():
    actions = np.array(
        [[0, 0, 0, 0, 0, 0, -1],  # no motion at the start: no-op
         [0.5, 0, 0, 0, 0, 0, -1],
         [0, 0, 0, 0, 0, 0, -1],  # no motion, gripper unchanged: no-op
         [0, 0, 0, 0, 0, 0, 1],  # no motion but the gripper closes: kept
         [0, 0, 5e-5, 0, 0, 0, 1]],  # below the threshold, same gripper: no-op
        dtype=float,
    )  # fmt: skip
    assert noop_mask(actions).tolist() == [True, False, True, False, True]


def test_recorded_model_paths_are_mapped_to_this_install():
    ensure_libero_ready()  # before the first libero import, which otherwise prompts on stdin
    from libero.libero import get_libero_path

    local = Path(get_libero_path("assets")) / "stable_scanned_objects" / "plate" / "texture.png"
    assert local.is_file()
    xml = (
        f'<mujoco><asset><texture name="t" file="{FOREIGN_LIBERO_ASSETS}/stable_scanned_objects/plate/texture.png"/>'
        f'<mesh name="m" file="{FOREIGN_ROBOSUITE_ASSETS}/grippers/meshes/panda_gripper/finger.stl"/></asset></mujoco>'
    )
    mapped = localize_model_xml(xml)
    assert f'file="{local}"' in mapped
    files = [part.split('"')[0] for part in mapped.split('file="')[1:]]
    assert len(files) == 2 and all(Path(f).is_file() for f in files), files
    with pytest.raises(FileNotFoundError, match="no_such_object/mesh.stl"):
        localize_model_xml(
            f'<mujoco><asset><mesh name="m" file="{FOREIGN_LIBERO_ASSETS}/no_such_object/mesh.stl"/></asset></mujoco>'
        )


def test_model_paths_are_mapped_on_a_machine_without_a_libero_config(tmp_path):
    """The mapping writes LIBERO's config itself: importing libero without one would prompt on stdin."""
    config_dir = tmp_path / "libero_config"
    xml = f'<mujoco><asset><mesh name="m" file="{FOREIGN_ROBOSUITE_ASSETS}/grippers/meshes/panda_gripper/finger.stl"/></asset></mujoco>'
    script = (
        "import sys; from lerobot_llava3d_fusion.tools.convert_libero import localize_model_xml; "
        "print(localize_model_xml(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, xml],
        env={**os.environ, "LIBERO_CONFIG_PATH": str(config_dir)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (config_dir / "config.yaml").is_file()
    assert FOREIGN_ROBOSUITE_ASSETS not in result.stdout and "finger.stl" in result.stdout


def write_layout(path: Path, drop: str) -> Path:
    """A tiny file in LIBERO's layout (no simulator), with one element removed."""
    with h5py.File(path, "w") as handle:
        if drop == "data":
            handle.create_group("demos")
            return path
        data = handle.create_group("data")
        attrs = {
            "env_args": json.dumps({"env_name": "x", "env_kwargs": {}}),
            "problem_info": json.dumps({"language_instruction": TASK}),
            "bddl_file_name": f"libero/libero/bddl_files/{SUITE}/"
            "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate.bddl",
        }
        for name, value in attrs.items():
            if name != drop:
                data.attrs[name] = value
        demo = data.create_group("demo_0")
        if drop != "actions":
            demo.create_dataset("actions", data=np.zeros((3, 7)))
        if drop != "states":
            demo.create_dataset("states", data=np.zeros((3, 10)))
    return path


@pytest.mark.parametrize(
    ("drop", "named"),
    [("data", "missing group 'data'"), ("problem_info", "data.attrs['problem_info']"),
     ("bddl_file_name", "data.attrs['bddl_file_name']"), ("states", "'data/demo_0/states'"),
     ("actions", "'data/demo_0/actions'")],
)  # fmt: skip
def test_a_file_in_another_layout_names_the_missing_key(tmp_path, capsys, drop, named):
    ensure_libero_ready()
    path = write_layout(tmp_path / "bad_demo.hdf5", drop)
    with pytest.raises(LiberoHDF5Error) as error:
        read_demo_jobs(path, SIZE, "states", False)
    assert named in str(error.value) and str(path) in str(error.value)
    # The command line says the same and exits with status 2, before creating anything.
    with pytest.raises(SystemExit) as exit_info:
        convert_libero.main(["--hdf5", str(path), "--repo-id", REPO_ID, "--root", str(tmp_path / "ds")])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_a_complete_file_is_listed_as_its_task(tmp_path):
    ensure_libero_ready()
    jobs = read_demo_jobs(write_layout(tmp_path / "ok_demo.hdf5", drop=""), SIZE, "actions", True)
    assert [(job.demo, job.suite, job.task_id, job.task) for job in jobs] == [
        ("demo_0", SUITE, TASK_ID, TASK)
    ]


def test_failed_replays_are_dropped_unless_kept(tmp_path, monkeypatch):
    """The writer's bookkeeping with --replay actions, with rendering replaced by fixed results."""
    ensure_libero_ready()
    path = tmp_path / SUITE / "task_demo.hdf5"
    path.parent.mkdir()
    write_layout(path, drop="")
    with h5py.File(path, "a") as handle:  # three demos: success, failure, success
        for index in (1, 2):
            handle.copy("data/demo_0", f"data/demo_{index}")
    outcome = {"demo_0": (True, 3), "demo_1": (False, 2), "demo_2": (True, 4)}

    def fake_render(job):
        success, length = outcome[job.demo]
        return DemoResult(job, fake_frames([float(length)] * length, TASK), recorded_steps=3, success=success)

    monkeypatch.setattr(convert_libero, "render_demo", fake_render)
    dropped = convert([path], REPO_ID, tmp_path / "dropped", image_size=16, replay="actions")
    assert (dropped.replays, dropped.successes, dropped.dropped_failed, dropped.episodes) == (3, 2, 1, 2)
    dataset = load(tmp_path / "dropped")
    assert dataset.meta.total_episodes == 2 and len(dataset) == 3 + 4
    assert dataset[3]["observation.state"][0].item() == 4.0  # episode 1 is demo_2
    log = json.loads((tmp_path / "dropped" / JOURNAL).read_text())["demos"]
    assert [(e["demo"], e["success"], e["episode_index"]) for e in log] == [
        ("demo_0", True, 0), ("demo_1", False, None), ("demo_2", True, 1)
    ]  # fmt: skip

    kept = convert([path], REPO_ID, tmp_path / "kept", image_size=16, replay="actions", keep_failed=True)
    assert (kept.replays, kept.successes, kept.dropped_failed, kept.episodes) == (3, 2, 0, 3)
    assert load(tmp_path / "kept").meta.total_episodes == 3
    # Resuming with other settings is refused; --keep-failed without action replay is an error.
    with pytest.raises(ValueError, match="converted with"):
        convert([path], REPO_ID, tmp_path / "kept", image_size=16, replay="actions")
    with pytest.raises(ValueError, match="--keep-failed"):
        convert([path], REPO_ID, tmp_path / "other", keep_failed=True)


# ---- Interruptions (no simulator) -------------------------------------------------------------------


def four_demo_file(folder: Path) -> Path:
    """A file in LIBERO's layout with demo_0..demo_3 (rendered by `libero_kill_points.fake_render`)."""
    path = folder / SUITE / "task_demo.hdf5"
    path.parent.mkdir(parents=True)
    write_layout(path, drop="")
    with h5py.File(path, "a") as handle:
        for index in (1, 2, 3):
            handle.copy("data/demo_0", f"data/demo_{index}")
    return path


def run_killed_converter(path: Path, root: Path, kill_at: str | None, log: Path):
    """The command line in a subprocess (fake rendering), SIGKILLed at `kill_at` (see libero_kill_points).
    The subprocess gets `e2e_utils.subprocess_env()`, with HF_HUB_OFFLINE=1 whatever the caller's
    environment: a Hub request then fails with huggingface_hub's "offline mode is enabled"."""
    import e2e_utils as e2e

    helper = Path(__file__).resolve().parent / "libero_kill_points.py"
    command = [sys.executable, str(helper), *(["--kill-at", kill_at] if kill_at else []), "--",
               "--hdf5", str(path), "--repo-id", REPO_ID, "--root", str(root), "--image-size", "16"]  # fmt: skip
    return e2e.run_command(command, log)


def test_converter_subprocesses_are_offline_whatever_the_callers_environment(monkeypatch):
    """The hard-kill tests read "offline" in a run's output as a Hub request: their subprocesses must run
    with HF_HUB_OFFLINE=1 even where the caller's environment sets it otherwise."""
    import e2e_utils as e2e

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert e2e.subprocess_env()["HF_HUB_OFFLINE"] == "1"


def assert_same_dataset(root: Path, reference: Path) -> None:
    """Same episodes, frames, actions, states, tasks, stats and journal as the uninterrupted conversion."""
    dataset, expected = load(root), load(reference)
    assert (dataset.meta.total_episodes, len(dataset)) == (expected.meta.total_episodes, len(expected))
    keys = ("episode_index", "frame_index", "index", "action", "observation.state", "observation.depth.image")
    for key in keys:
        torch.testing.assert_close(
            torch.stack([dataset[i][key] for i in range(len(dataset))]),
            torch.stack([expected[i][key] for i in range(len(expected))]),
            msg=key,
        )
    tasks = [dataset[i]["task"] for i in range(len(dataset))]
    assert tasks == [expected[i]["task"] for i in range(len(expected))]
    assert [dataset.meta.episodes[i]["length"] for i in range(dataset.meta.total_episodes)] == [
        expected.meta.episodes[i]["length"] for i in range(expected.meta.total_episodes)
    ]
    stats, expected_stats = (json.loads((r / "meta" / "stats.json").read_text()) for r in (root, reference))
    assert stats.keys() == expected_stats.keys()
    for key in stats:
        for name in stats[key]:
            np.testing.assert_allclose(
                stats[key][name], expected_stats[key][name], rtol=1e-6, err_msg=f"{key}/{name}"
            )
    journal, expected_journal = (json.loads((r / JOURNAL).read_text())["demos"] for r in (root, reference))
    assert [(e["demo"], e["episode_index"], e["frames"]) for e in journal] == [
        (e["demo"], e["episode_index"], e["frames"]) for e in expected_journal
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """The four-demo file and its conversion in one go (fake rendering, in this process)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    path = four_demo_file(folder)
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_fake_rendering(convert_libero, monkeypatch.setattr)
        summary = convert([path], REPO_ID, folder / "dataset", image_size=16)
    assert (summary.episodes, summary.frames) == (4, 2 + 3 + 2 + 3)
    return path, folder / "dataset"


def test_a_converter_killed_mid_episode_resumes_offline_to_the_same_dataset(
    uninterrupted, tmp_path, monkeypatch
):
    """SIGKILL after the second episode's rows reached the data parquet (no footer yet): the next run
    removes that episode's files, resumes after the first episode, reads no Hub, and gives the same
    dataset as an uninterrupted run."""
    path, reference = uninterrupted
    root = tmp_path / "dataset"
    killed = run_killed_converter(path, root, "data:2", tmp_path / "killed.log")
    assert killed.returncode == -9, killed.describe()
    assert json.loads((root / JOURNAL).read_text())["demos"][-1]["demo"] == "demo_0"

    use_fake_rendering(convert_libero, monkeypatch.setattr)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the variable when it was imported: offline for this run whatever it said then.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    summary = convert([path], REPO_ID, root, image_size=16)
    assert (summary.skipped, summary.episodes, summary.frames) == (1, 3, 3 + 2 + 3)
    assert not [file for file in (root / "images").rglob("*") if file.is_file()]  # LeRobot's staged frames
    assert_same_dataset(root, reference)


@pytest.mark.slow
def test_conversion_survives_a_hard_kill_at_every_point(uninterrupted, tmp_path):
    """One dataset, converted by a chain of command-line runs each SIGKILLed at another point (see
    libero_kill_points), then one that completes: equal to the uninterrupted conversion, and no run
    asks to start over or reaches for the Hub."""
    path, reference = uninterrupted
    root = tmp_path / "dataset"
    # create: before the journal; frame:3: demo_1's first frame staged; data: rows without a footer;
    # saved: info/stats count the episode; closed: files complete, not in the journal; journal: the new
    # journal not yet in place; data:2: a run that finished demo_1 dies in demo_2.
    for kill_at in ("create:1", "frame:3", "data:1", "saved:1", "closed:1", "journal:1", "data:2"):
        result = run_killed_converter(path, root, kill_at, tmp_path / f"{kill_at}.log")
        assert result.returncode == -9, result.describe()
        assert "offline" not in result.output.lower(), result.describe()
        assert "convert again" not in result.output, result.describe()
    journal = json.loads((root / JOURNAL).read_text())["demos"]
    assert [entry["demo"] for entry in journal] == ["demo_0", "demo_1"]
    result = run_killed_converter(path, root, None, tmp_path / "final.log")
    assert result.returncode == 0, result.describe()
    assert "offline" not in result.output.lower() and "2 demos were already converted" in result.output
    assert not root.with_name(f".{root.name}.creating").exists()
    assert_same_dataset(root, reference)


@pytest.mark.parametrize(
    ("files", "named"),
    [({"meta/info.json": "{}"}, "did not write"), ({"notes.txt": ""}, "is not empty"),
     ({"meta/info.json": "{}", "meta/libero_conversion.jsonl": ""}, "earlier version")],
)  # fmt: skip
def test_a_root_this_converter_cannot_resume_is_refused(uninterrupted, tmp_path, monkeypatch, files, named):
    path, _ = uninterrupted
    use_fake_rendering(convert_libero, monkeypatch.setattr)
    root = tmp_path / "dataset"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    with pytest.raises(FileExistsError, match=named):
        convert([path], REPO_ID, root, image_size=16)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(files)


def test_max_demos_is_at_least_one_or_all(tmp_path, capsys):
    for value in ("-1", "0", "two"):
        with pytest.raises(SystemExit) as exit_info:
            convert_libero.main(["--hdf5", "x.hdf5", "--repo-id", REPO_ID, "--root", str(tmp_path / "ds"),
                                 "--max-demos", value])  # fmt: skip
        assert exit_info.value.code == 2
        assert "--max-demos" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_demos must be >= 1"):
        convert([tmp_path], REPO_ID, tmp_path / "ds", max_demos=-1)


def test_max_demos_all_converts_every_demo_and_n_the_first_n(uninterrupted, tmp_path, monkeypatch):
    path, _ = uninterrupted
    use_fake_rendering(convert_libero, monkeypatch.setattr)
    for value, count in (("all", 4), ("3", 3)):
        root = tmp_path / value
        args = ["--hdf5", str(path), "--repo-id", REPO_ID, "--root", str(root), "--image-size", "16"]
        assert convert_libero.main([*args, "--max-demos", value]) == 0
        demos = json.loads((root / JOURNAL).read_text())["demos"]
        assert [entry["demo"] for entry in demos] == [f"demo_{index}" for index in range(count)]


# ---- Simulator --------------------------------------------------------------------------------------


def test_frame_counts_features_and_resume(converted):
    first, second = converted["first"], converted["second"]
    assert (first.episodes, first.frames, first.skipped) == (1, 6, 0)
    assert (second.episodes, second.frames, second.skipped) == (1, 4, 1)  # demo_0 was not redone

    dataset = load(converted["root"])
    assert dataset.meta.total_episodes == 2 and len(dataset) == 10 and dataset.fps == 10
    assert [dataset.meta.episodes[i]["length"] for i in range(2)] == [6, 4]
    features = dataset.meta.features
    for cam in CAMERAS:
        assert tuple(features[f"observation.images.{cam}"]["shape"]) == (SIZE, SIZE, 3)
        assert features[f"observation.depth.{cam}"]["dtype"] == "image"  # LeRobot depth map, lossless
        assert features[f"observation.depth.{cam}"]["info"] == {"is_depth_map": True, "depth_unit": "m"}
        assert tuple(features[f"observation.intrinsics.{cam}"]["shape"]) == (3, 3)
        assert tuple(features[f"observation.extrinsics.{cam}"]["shape"]) == (4, 4)
    assert tuple(features["observation.state"]["shape"]) == (8,) and tuple(features["action"]["shape"]) == (
        7,
    )

    actions = [demo_actions()[0], demo_actions()[1]]
    for index in range(len(dataset)):
        frame = dataset[index]
        episode, step = int(frame["episode_index"]), int(frame["frame_index"])
        assert frame["task"] == converted["truth"]["task"] == TASK
        np.testing.assert_allclose(frame["action"].numpy(), actions[episode][step], atol=1e-6)


def test_rendered_rgb_matches_the_stored_rgb_of_the_same_states(converted):
    dataset = load(converted["root"])
    with h5py.File(converted["hdf5"]) as handle:
        for index in range(len(dataset)):
            frame = dataset[index]
            episode, step = int(frame["episode_index"]), int(frame["frame_index"])
            # Mean absolute difference to the stored image of every step of the episode, summed over cameras.
            diff_to_each_step = 0.0
            for cam, stored_key in CAMERAS.items():
                stored = handle[f"data/demo_{episode}/obs/{stored_key}"][:].astype(
                    float
                )  # robosuite's buffer
                rendered = frame[f"observation.images.{cam}"].permute(1, 2, 0).numpy() * 255
                # LeRobot's LIBERO convention: robosuite's image rotated by 180 degrees.
                per_step = np.abs(rendered - stored[:, ::-1, ::-1]).mean(axis=(1, 2, 3))
                diff_to_each_step = diff_to_each_step + per_step
                # Identical at rest; while the arm moves, LIBERO-style stored images (taken right after
                # a physics step) lag the recorded state by one substep: a few pixels at moving edges,
                # plus the video codec's loss (about 2 grey levels on average for the moving wrist camera).
                assert per_step[step] < (0.5 if step == 0 else 3.0), (episode, step, cam, per_step[step])
                if step == 0:
                    rotation_ignored = np.abs(rendered - stored[0]).mean()
                    assert rotation_ignored > 10 * max(per_step[0], 1.0), cam  # the rotation matters
            # The frame shows its own step's state, not a neighbour's (an off-by-one would pick another).
            assert int(np.argmin(diff_to_each_step)) == step, (episode, step, diff_to_each_step)


def test_state_is_lerobots_8d_libero_state(converted):
    dataset = load(converted["root"])
    with h5py.File(converted["hdf5"]) as handle:
        for index in (0, 6):  # the first frame of each episode (the arm at rest)
            frame = dataset[index]
            episode = int(frame["episode_index"])
            ee = handle[f"data/demo_{episode}/obs/ee_states"][0]
            gripper = handle[f"data/demo_{episode}/obs/gripper_states"][0]
            np.testing.assert_allclose(
                frame["observation.state"].numpy(), np.concatenate([ee, gripper]), atol=1e-4
            )


def test_depth_of_the_plate_pixel_back_projects_to_the_plate(converted):
    """Project the plate's sim position into each camera, read the depth there, back-project: < 1 cm."""
    dataset = load(converted["root"])
    positions = [demo["positions"] for demo in converted["truth"]["demos"]]
    for index in range(len(dataset)):
        frame = dataset[index]
        plate = torch.tensor(
            positions[int(frame["episode_index"])][int(frame["frame_index"])]["plate_1_main"]
        )
        for cam in CAMERAS:
            k, cam_to_world = frame[f"observation.intrinsics.{cam}"], frame[f"observation.extrinsics.{cam}"]
            row, col = project(plate, k, cam_to_world)
            assert 0 <= row < SIZE and 0 <= col < SIZE, (cam, row, col)
            depth = frame[f"observation.depth.{cam}"]
            assert depth.shape == (1, SIZE, SIZE) and depth.dtype == torch.float32
            points, valid = backproject_depth(depth[None], k[None], cam_to_world[None])
            assert valid[0, row, col]
            error = torch.linalg.norm(points[0, row, col].double() - plate.double()).item()
            assert error < 0.01, (index, cam, error)


def test_action_replay_starts_at_the_recorded_state_and_counts_successes(libero_file, converted, tmp_path):
    path, _ = libero_file
    summary = convert([path], REPO_ID, tmp_path / "replayed", image_size=SIZE, replay="actions",
                      drop_noops=True, keep_failed=True)  # fmt: skip
    # The random motions do not solve the task: 0 of 2 replays succeed (kept with --keep-failed).
    assert (summary.replays, summary.successes, summary.episodes, summary.noops) == (2, 0, 2, 2)
    replayed, restored = load(tmp_path / "replayed"), load(converted["root"])
    assert len(replayed) == (6 - 2) + 4
    # demo_0's first action is a no-op: the replay's first frame is still the recorded first state.
    for key in ("observation.state", "observation.images.image", "observation.depth.image2"):
        torch.testing.assert_close(replayed[0][key], restored[0][key], atol=1e-4, rtol=0, msg=key)
    np.testing.assert_allclose(replayed[0]["action"].numpy(), demo_actions()[0][1], atol=1e-6)


# ---- lerobot-train / lerobot-eval on the converted dataset -----------------------------------------


@pytest.mark.slow
def test_converted_dataset_trains_and_the_checkpoint_runs_in_libero_rgbd(libero_file, converted, tmp_path):
    """The command line (2 workers) gives the same dataset; lerobot-train with geometry=depth on it;
    lerobot-eval of that checkpoint in libero_rgbd with no rename map (the camera names agree)."""
    import e2e_utils as e2e

    path, _ = libero_file
    root = tmp_path / "cli_dataset"
    result = e2e.run_module(
        "lerobot_llava3d_fusion.tools.convert_libero",
        ["--hdf5", str(path), "--repo-id", REPO_ID, "--root", str(root), "--image-size", str(SIZE),
         "--workers", "2"],
        tmp_path / "convert.log", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    cli, reference = load(root), load(converted["root"])
    assert len(cli) == len(reference) == 10
    for index in (0, 9):
        for key in ("observation.images.image2", "observation.depth.image", "observation.state"):
            torch.testing.assert_close(cli[index][key], reference[index][key], msg=key)

    output_dir = tmp_path / "train"
    train = e2e.run_lerobot(
        "lerobot_train",
        e2e.train_args(REPO_ID, root, output_dir, steps=6, log_freq=2, batch_size=4,
                       extra=["--policy.geometry=depth"]),
        tmp_path / "train.log", timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.describe()
    checkpoint = e2e.last_checkpoint(output_dir)
    config = e2e.read_json(checkpoint / "config.json")
    assert config["geometry"] == "depth"
    for cam in CAMERAS:
        assert f"observation.depth.{cam}" in config["input_features"]

    eval_dir = tmp_path / "eval"
    evaluation = e2e.run_lerobot(
        "lerobot_eval",
        [f"--policy.path={checkpoint}", "--env.type=libero_rgbd", f"--env.task={SUITE}",
         f"--env.task_ids=[{TASK_ID}]", "--env.episode_length=30", f"--env.observation_height={SIZE}",
         f"--env.observation_width={SIZE}", "--eval.n_episodes=1", "--eval.batch_size=1",
         "--policy.device=cpu", f"--output_dir={eval_dir}"],
        tmp_path / "eval.log", timeout=600,
    )  # fmt: skip
    assert evaluation.returncode == 0, evaluation.describe()
    info = e2e.read_json(eval_dir / "eval_info.json")
    assert info["overall"]["n_episodes"] == 1
    assert info["per_task"][0]["task_group"] == SUITE and info["per_task"][0]["task_id"] == TASK_ID
