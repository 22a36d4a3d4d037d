"""bench/robustness.py: what it trains and evaluates, checked on its lerobot-train / lerobot-eval
argument lists with both scripts stubbed (no training)."""

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import draccus
import pytest
from lerobot.envs.configs import EnvConfig

from lerobot_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.demo import touch_block_demo as demo
from lerobot_llava3d_fusion.envs.configs import TouchBlockEnvConfig

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "robustness.py"


@pytest.fixture(scope="module")
def robustness():
    spec = importlib.util.spec_from_file_location("robustness_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@dataclass
class EvalCommandLine:
    env: EnvConfig


def stub_rate(env: TouchBlockEnvConfig, checkpoint: str) -> float:
    """A made-up success rate that falls with the camera move and with sensor depth."""
    rate = 90.0 - 400 * env.camera_translation_perturbation
    if env.depth_noise == "sensor":
        rate -= 5.0 if "noise_trained" in checkpoint else 30.0
    return rate


@pytest.fixture
def stubbed(tmp_path, monkeypatch, robustness):
    """Stubs the demo's data, lerobot-train and lerobot-eval; returns the recorded calls."""
    calls = {"train": [], "eval": [], "datasets": []}

    def run_lerobot(script, args, log_path, environment=None):
        options = dict(arg.removeprefix("--").split("=", 1) for arg in args)
        output_dir = Path(options["output_dir"])
        if script == "lerobot_train":
            calls["train"].append(args)
            (output_dir / "checkpoints" / "last" / "pretrained_model").mkdir(parents=True)
            return
        assert script == "lerobot_eval"
        calls["eval"].append(args)
        env = draccus.parse(EvalCommandLine, args=[a for a in args if a.startswith("--env.")]).env
        output_dir.mkdir(parents=True)
        rate = stub_rate(env, options["policy.path"])
        episodes = int(options["eval.n_episodes"])
        successes = [index < round(rate * episodes / 100) for index in range(episodes)]  # first ones succeed
        info = {"overall": {"pc_success": rate}, "per_task": [{"metrics": {"successes": successes}}]}
        (output_dir / "eval_info.json").write_text(json.dumps(info))

    def prepare_demo_data(workdir, num_blocks, episodes, every_block_as_target, near_target_starts):
        return "data", workdir / "dataset_data", workdir / "backbone"

    monkeypatch.setattr(demo, "run_lerobot", run_lerobot)
    monkeypatch.setattr(demo, "prepare_demo_data", prepare_demo_data)

    def make_touch_block_dataset(**kwargs):
        calls["datasets"].append(kwargs)
        Path(kwargs["root"]).mkdir(parents=True)

    monkeypatch.setattr(robustness, "make_touch_block_dataset", make_touch_block_dataset)
    return calls


def policy_config(train_args: list[str]) -> Llava3DFusionConfig:
    """The policy config lerobot-train would build from the preset and the `--policy.*` arguments."""
    fields = {k: v for k, v in json.loads(demo.PRESET.read_text())["policy"].items() if k != "type"}
    for arg in train_args:
        name, _, value = arg.removeprefix("--policy.").partition("=")
        if arg.startswith("--policy.") and name in ("geometry", "geometry_origin", "augment_depth_noise"):
            fields[name] = {"true": True, "false": False}.get(value, value)
    return Llava3DFusionConfig(**fields)  # raises on a combination lerobot-train would refuse


def output_dir_name(args: list[str]) -> str:
    return Path(dict(arg.split("=", 1) for arg in args)["--output_dir"]).name


def test_every_experiment_trains_each_policy_once_and_evaluates_it_on_the_same_seeds(
    tmp_path, stubbed, robustness
):
    results = robustness.main(["--workdir", str(tmp_path), "--steps", "3", "--eval-episodes", "7"])

    # Five policies, each trained once with the demo's recipe and a valid config.
    trained = {output_dir_name(args): args for args in stubbed["train"]}
    assert sorted(trained) == sorted(
        f"train_{name}" for name in
        ("depth_ee_points", "depth_world_points", "no_geometry", "depth_noise_trained",
         "depth_camera_trained")
    )  # fmt: skip
    configs = {name.removeprefix("train_"): policy_config(args) for name, args in trained.items()}
    depth_ee = configs["depth_ee_points"]
    assert (depth_ee.geometry, depth_ee.geometry_origin) == ("depth", "state")
    assert configs["depth_world_points"].geometry_origin == "world"
    assert configs["no_geometry"].geometry == "none"
    assert configs["depth_noise_trained"].augment_depth_noise is True
    assert not configs["depth_ee_points"].augment_depth_noise
    for args in trained.values():
        assert "--steps=3" in args and f"--config_path={demo.PRESET}" in args
    # The camera-trained policy learns from episodes with the medium camera move drawn per episode.
    (dataset,) = stubbed["datasets"]
    moves = (dataset["camera_translation_perturbation"], dataset["camera_rotation_perturbation"])
    assert moves == (0.05, 5.0)
    assert f"--dataset.root={dataset['root']}" in trained["train_depth_camera_trained"]
    assert f"--dataset.root={tmp_path / 'dataset_data'}" in trained["train_depth_ee_points"]

    # Evaluations: valid env options, the same episodes everywhere.
    envs = []
    for args in stubbed["eval"]:
        assert f"--seed={demo.EVAL_START_SEED}" in args and "--eval.n_episodes=7" in args
        envs.append(draccus.parse(EvalCommandLine, args=[a for a in args if a.startswith("--env.")]).env)
    camera_sizes = {(e.camera_translation_perturbation, e.camera_rotation_perturbation) for e in envs}
    assert camera_sizes == {(0.0, 0.0), (0.02, 2.0), (0.05, 5.0), (0.1, 10.0)}
    assert {e.depth_noise for e in envs} == {"none", "sensor"}
    assert len(stubbed["eval"]) == 3 * 4 + 2 * 2 + 4

    rates = results["success_rate_pc"]
    assert rates["no_geometry"]["camera_5cm_5deg"] == pytest.approx(70.0)
    assert rates["depth_noise_trained"] == {"depth_none": 90.0, "depth_sensor": 85.0}
    targets = results["targets"]
    assert targets["depth_noise_trained: sensor depth"]["met"] is True
    assert targets["depth_ee_points: medium camera move"]["retained_share"] == pytest.approx(70 / 90)
    assert targets["depth_ee_points: medium camera move"]["met"] is False
    # Larger moves take more targets out of the 64 x 64 view; the nominal camera sees every one.
    out_of_view = results["target_out_of_view_pc"]
    assert out_of_view["camera_0cm_0deg"] == 0.0
    assert out_of_view["camera_2cm_2deg"] <= out_of_view["camera_5cm_5deg"] < out_of_view["camera_10cm_10deg"]
    # With every target in view, the in-view success is the share of successful episodes (the stub's
    # 90 % of 7 episodes: the first 6).
    in_view = results["success_in_view_pc"]
    assert set(in_view) == {"depth_ee_points", "depth_world_points", "no_geometry", "depth_camera_trained"}
    assert in_view["no_geometry"]["camera_0cm_0deg"] == pytest.approx(100 * 6 / 7)
    spread = results["pixel_point_spread_mm"]
    assert set(spread) == {"camera_0cm_0deg", "camera_5cm_5deg"}
    assert spread["camera_0cm_0deg"]["world"] < spread["camera_5cm_5deg"]["world"]
    run_dir = tmp_path / "data_3_steps"
    assert json.loads((run_dir / "robustness.json").read_text())["success_rate_pc"] == rates
    assert (run_dir / "robustness.png").stat().st_size > 0

    # A rerun reuses every checkpoint and evaluation.
    before = {key: len(value) for key, value in stubbed.items()}
    robustness.main(["--workdir", str(tmp_path), "--steps", "3", "--eval-episodes", "7"])
    assert {key: len(value) for key, value in stubbed.items()} == before


def test_one_experiment_and_custom_sizes(tmp_path, stubbed, robustness):
    robustness.main(
        ["--workdir", str(tmp_path), "--steps", "3", "--experiments", "camera",
         "--camera-perturbations", "0,0", "0.03,4"]
    )  # fmt: skip
    assert len(stubbed["train"]) == 3 and not stubbed["datasets"]
    labels = {output_dir_name(args).split("_camera_")[1] for args in stubbed["eval"]}
    assert labels == {"0cm_0deg", "3cm_4deg"}
    with pytest.raises(SystemExit):
        robustness.parse_args(["--camera-perturbations", "5cm"])


def test_outcomes_option_runs_the_medium_move_and_sensor_depth_with_typed_env_options(
    tmp_path, stubbed, robustness, monkeypatch
):
    recorded = []

    def touch_block_outcomes(checkpoint, episodes, start_seed, num_blocks, **env_options):
        TouchBlockEnvConfig(num_blocks=num_blocks, **env_options)  # the options it would build its env from
        recorded.append(env_options)
        return robustness.dataclasses.make_dataclass("Summary", ["episodes"])(episodes)

    monkeypatch.setattr(robustness, "touch_block_outcomes", touch_block_outcomes)
    results = robustness.main(["--workdir", str(tmp_path), "--steps", "3", "--outcomes"])
    assert {"camera_translation_perturbation": 0.05, "camera_rotation_perturbation": 5.0} in recorded
    assert {"depth_noise": "sensor"} in recorded
    # The medium move for the three camera-experiment policies and the camera-trained one; sensor depth
    # for the clean-trained and the noise-trained policies.
    assert len(recorded) == 4 + 2
    assert results["where_episodes_ended"]["depth_noise_trained_depth_sensor"] == {"episodes": 50}


def test_policies_option_trains_and_evaluates_only_the_chosen_policies(tmp_path, stubbed, robustness):
    assert set(robustness.trainings((0.05, 5.0))) == set(robustness.POLICIES)
    results = robustness.main(
        ["--workdir", str(tmp_path), "--steps", "3", "--experiments", "camera", "depth_noise",
         "--policies", "depth_ee_points", "no_geometry"]
    )  # fmt: skip
    trained = sorted(output_dir_name(args) for args in stubbed["train"])
    assert trained == ["train_depth_ee_points", "train_no_geometry"]
    assert len(stubbed["eval"]) == 2 * 4 + 2  # both at every camera size, the depth policy under noise
    assert set(results["success_rate_pc"]) == {"depth_ee_points", "no_geometry"}
    with pytest.raises(SystemExit, match="none of --policies depth_camera_trained"):
        robustness.main(
            ["--workdir", str(tmp_path), "--experiments", "camera", "--policies", "depth_camera_trained"]
        )


def test_several_blocks_train_with_the_demos_recipe_leaving_out_the_last_frames(
    tmp_path, stubbed, robustness
):
    argv = ["--workdir", str(tmp_path), "--steps", "3", "--experiments", "camera",
            "--camera-perturbations", "0,0"]  # fmt: skip
    robustness.main([*argv, "--policies", "depth_world_points", "--num-blocks", "3"])
    robustness.main([*argv, "--policies", "depth_ee_points"])
    several, one = stubbed["train"]
    assert f"--policy.drop_n_last_frames={demo.DEFAULT_DROP_N_LAST_FRAMES_SEVERAL_BLOCKS}" in several
    assert "--policy.geometry_origin=world" in several  # the experiment's own option kept beside it
    assert f"--output_dir={tmp_path / 'data_3_steps_drop_last_6' / 'train_depth_world_points'}" in several
    assert not any("drop_n_last_frames" in arg for arg in one)


def test_success_in_view_sets_aside_the_episodes_whose_target_left_the_image(tmp_path, robustness):
    evaluation = robustness.Evaluation("camera", "depth_ee_points", "camera_5cm_5deg", {})
    noise = robustness.Evaluation("depth_noise", "depth_ee_points", "depth_sensor", {})
    (tmp_path / f"eval_{evaluation.name}").mkdir()
    successes = [True, True, False, False, True]
    info = {"overall": {"pc_success": 60.0}, "per_task": [{"metrics": {"successes": successes}}]}
    (tmp_path / f"eval_{evaluation.name}" / "eval_info.json").write_text(json.dumps(info))
    out_of_view = {0: {"camera_5cm_5deg": [False, True, False, True, False]}}
    rates = robustness.success_in_view(tmp_path, [evaluation, noise], out_of_view)
    assert rates == {"depth_ee_points": {"camera_5cm_5deg": pytest.approx(200 / 3)}}  # 2 of the 3 in view
    with pytest.raises(ValueError, match="holds 5 episodes, not 4"):
        robustness.success_in_view(tmp_path, [evaluation], {0: {"camera_5cm_5deg": [False] * 4}})

    # A second draw of other episodes: pooled with the first over the episodes in view (2 + 1 of 3 + 2).
    second = robustness.dataclasses.replace(evaluation, draw=1)
    assert second.name == "depth_ee_points_camera_5cm_5deg_draw_1"
    (tmp_path / f"eval_{second.name}").mkdir()
    info["per_task"][0]["metrics"]["successes"] = [False, True, False, False, False]
    (tmp_path / f"eval_{second.name}" / "eval_info.json").write_text(json.dumps(info))
    out_of_view[1] = {"camera_5cm_5deg": [True, False, True, True, False]}
    rates = robustness.success_in_view(tmp_path, [evaluation, second], out_of_view)
    assert rates == {"depth_ee_points": {"camera_5cm_5deg": pytest.approx(100 * 3 / 5)}}


def test_eval_draws_evaluate_every_cell_on_disjoint_episodes_and_report_the_mean(
    tmp_path, stubbed, robustness, monkeypatch
):
    rates_by_seed = {
        demo.eval_start_seed(0): 90.0,
        demo.eval_start_seed(1): 70.0,
        demo.eval_start_seed(2): 80.0,
    }
    run_lerobot = demo.run_lerobot

    def seeded_run_lerobot(script, args, log_path, environment=None):
        run_lerobot(script, args, log_path, environment)
        if script == "lerobot_eval":  # the stub's rate, replaced by one that depends on the episodes' seed
            options = dict(arg.removeprefix("--").split("=", 1) for arg in args)
            info_path = Path(options["output_dir"]) / "eval_info.json"
            info = json.loads(info_path.read_text())
            info["overall"]["pc_success"] = rates_by_seed[int(options["seed"])]
            info_path.write_text(json.dumps(info))

    monkeypatch.setattr(demo, "run_lerobot", seeded_run_lerobot)
    outcome_calls = []

    def touch_block_outcomes(checkpoint, episodes, start_seed, num_blocks, **env_options):
        outcome_calls.append(start_seed)
        return robustness.dataclasses.make_dataclass("Summary", ["episodes"])(episodes)

    monkeypatch.setattr(robustness, "touch_block_outcomes", touch_block_outcomes)
    argv = ["--workdir", str(tmp_path), "--steps", "3", "--experiments", "camera", "--policies",
            "depth_ee_points", "--camera-perturbations", "0,0", "0.05,5", "--eval-draws", "3", "--outcomes",
            "--eval-episodes", "5"]  # fmt: skip
    results = robustness.main(argv)

    seeds = sorted(int(a.removeprefix("--seed=")) for args in stubbed["eval"] for a in args if "--seed=" in a)
    assert seeds == sorted(2 * list(rates_by_seed))  # each of the two cells on the three sets of episodes
    assert len({output_dir_name(args) for args in stubbed["eval"]}) == 6
    per_draw = results["success_rate_pc_per_draw"]["depth_ee_points"]
    assert per_draw == {"camera_0cm_0deg": [90.0, 70.0, 80.0], "camera_5cm_5deg": [90.0, 70.0, 80.0]}
    assert results["success_rate_pc"]["depth_ee_points"]["camera_5cm_5deg"] == pytest.approx(80.0)
    assert results["eval_start_seeds"] == list(rates_by_seed)
    assert outcome_calls == [demo.eval_start_seed(0)]  # where episodes ended: the first draw's episodes
    run_dir = tmp_path / "data_3_steps"
    assert json.loads((run_dir / "robustness_3_draws.json").read_text())["eval_draws"] == 3
    assert not (run_dir / "robustness.json").exists()  # the one-draw record is not overwritten

    # A rerun reuses every evaluation and the recorded outcomes.
    evaluations = len(stubbed["eval"])
    robustness.main(argv)
    assert len(stubbed["eval"]) == evaluations and outcome_calls == [demo.eval_start_seed(0)]
    with pytest.raises(SystemExit):
        robustness.parse_args(["--eval-draws", "0"])


def test_a_fixed_camera_gives_each_pixel_nearly_the_same_world_point_in_every_episode(robustness):
    """The nominal camera: a pixel's world x/y moves only with the depth it sees (millimetres), while
    its point from the end-effector moves with the end-effector (centimetres); a camera moved per
    episode moves the world points too."""
    fixed = robustness.pixel_point_spread_mm((0.0, 0.0), episodes=12, num_blocks=1)
    moved = robustness.pixel_point_spread_mm((0.05, 5.0), episodes=12, num_blocks=1)
    assert fixed["world"] < 3.0 and fixed["end_effector"] > 50.0
    assert moved["world"] > 10 * fixed["world"]
