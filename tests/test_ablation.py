"""The ablation command's own pieces (`lerobot_llava3d_fusion.demo.ablation`); its full run is not a test."""

import json
from pathlib import Path

import pytest

from lerobot_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.demo.ablation import (
    DEFAULT_STEP_VARIANTS,
    DEFAULT_VARIANTS,
    PRESET,
    VARIANTS,
    format_table,
    step_seconds,
)


def test_the_default_variant_is_the_default_configuration():
    """The row labelled "(default)" must be what a user gets: the policy's defaults, the demo's preset."""
    default = VARIANTS[0]
    assert "(default)" in default.name and default.name in DEFAULT_VARIANTS
    config = Llava3DFusionConfig()
    assert (default.expert_mode, default.expert_width_multiplier, default.time_sampling) == (
        config.expert_mode,
        config.expert_width_multiplier,
        config.time_sampling,
    )
    preset = json.loads(PRESET.read_text())["policy"]
    assert preset["expert_mode"] == config.expert_mode and preset["num_steps"] == config.num_steps
    original = next(v for v in VARIANTS if "(original)" in v.name)
    assert (original.expert_mode, original.time_sampling) == ("shared", "uniform")
    assert {default.name, original.name} == set(DEFAULT_STEP_VARIANTS)
    # Every comparison the ablation exists for has both sides among the variants trained by default.
    trained = [v for v in VARIANTS if v.name in DEFAULT_VARIANTS]
    assert {v.expert_mode for v in trained} == {"shared", "separate"}
    assert len({v.expert_width_multiplier for v in trained if v.expert_mode == "separate"}) >= 2
    assert {v.time_sampling for v in trained} == {"beta", "uniform"}


def test_step_seconds_leave_out_the_warm_up_line():
    log = (
        "INFO step:2 smpl:64 loss:2.6 updt_s:2.000 data_s:25.000 smp/s:1\n"
        "INFO step:4 smpl:128 loss:2.2 updt_s:2.000 data_s:1.000 smp/s:9\n"
        "INFO step:6 smpl:192 loss:2.1 updt_s:1.500 data_s:0.500 smp/s:10\n"
    )
    assert step_seconds(log) == pytest.approx(2.5)
    assert step_seconds(log.splitlines()[0]) == pytest.approx(27.0)  # a single line is all there is
    with pytest.raises(RuntimeError, match="updt_s"):
        step_seconds("no metrics here")


def test_table_prints_every_row_and_the_references():
    row = {"variant": "shared, beta", "num_steps": 20, "train_steps": 45, "samples_per_s": 9.78,
           "chunk_latency_s": 0.1234, "success_pc": 40.0}  # fmt: skip
    table = format_table([row], {"expert": 100.0, "random": 0.0}, episodes=30)
    lines = table.splitlines()
    assert "success over 30 episodes" in lines[0]
    assert lines[2] == "| shared, beta | 20 | 45 | 9.8 | 123.4 | 40.0 % |"
    assert lines[3].startswith("| scripted expert |") and lines[3].endswith("100.0 % |")
    assert len(lines) == 5


def test_everything_the_ablation_writes_lands_under_its_workdir(tmp_path, monkeypatch):
    """A run with LeRobot's scripts, the demo data and the latency measurement stubbed: every path the
    ablation chooses (logs, checkpoints, evaluations, results.json) is under --workdir, none in the
    current directory (the source tree, when run from a checkout)."""
    from lerobot_llava3d_fusion.demo import ablation

    scripts_run = []

    def fake_run_lerobot(script, args, log_path):
        scripts_run.append(script)
        options = dict(arg.removeprefix("--").split("=", 1) for arg in args)
        log_path.write_text(f"{script} log")
        if script == "lerobot_eval":
            output_dir = Path(options["output_dir"])
            output_dir.mkdir(parents=True)
            (output_dir / "eval_info.json").write_text(json.dumps({"overall": {"pc_success": 50.0}}))
        return "step:2 updt_s:0.100 data_s:0.010\nstep:4 updt_s:0.100 data_s:0.010\n", 1.0

    def fake_demo_data(workdir, num_blocks, episodes):
        return "data", workdir / "dataset", workdir / "backbone"

    monkeypatch.setattr(ablation, "run_lerobot", fake_run_lerobot)
    monkeypatch.setattr(ablation, "prepare_demo_data", fake_demo_data)
    monkeypatch.setattr(ablation, "reference_success", lambda policy, episodes, num_blocks: 0.0)
    monkeypatch.setattr(ablation, "chunk_latency", lambda *args: 0.1)
    cwd, workdir = tmp_path / "cwd", tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ablation.main(["--workdir", str(workdir), "--variants", VARIANTS[0].name, "--eval-episodes", "2"])

    assert scripts_run == ["lerobot_train", "lerobot_train", "lerobot_eval", "lerobot_eval"]
    assert list(cwd.iterdir()) == []
    (results,) = workdir.glob("*/results.json")
    assert json.loads(results.read_text())["complete"]
