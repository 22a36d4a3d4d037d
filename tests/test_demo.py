"""The demo's own pieces: its backbone checkpoint, the reference success rates and the evaluations
it asks of lerobot-eval (with lerobot-eval stubbed: no training, no policy)."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import draccus
import e2e_utils as e2e
import gymnasium as gym
import numpy as np
import pytest
import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig

from lerobot_llava3d_fusion.backbones.loading import build_word_tokenizer, load_backbone
from lerobot_llava3d_fusion.configuration_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.demo import touch_block_demo as demo
from lerobot_llava3d_fusion.demo.touch_block_demo import (
    evaluate_policy,
    reference_success,
    write_demo_backbone,
)
from lerobot_llava3d_fusion.demo.touch_block_figures import (
    SIDE_VIEW_FIGURE,
    SUCCESS_FIGURE,
    write_demo_figures,
)
from lerobot_llava3d_fusion.demo.touch_block_outcomes import (
    EpisodeTrace,
    OutcomeSummary,
    policy_episode_trace,
)
from lerobot_llava3d_fusion.envs import touch_block
from lerobot_llava3d_fusion.envs.configs import TouchBlockEnvConfig
from lerobot_llava3d_fusion.envs.touch_block import PALETTE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def policy_side_view(monkeypatch) -> list[tuple]:
    """The side view's policy episode stubbed (the stubbed runs have no checkpoint): a policy that
    stops 2 cm above the named block's top. Returns the calls."""
    calls = []

    def policy_episode_trace(checkpoint, seed, label, **env_options):
        calls.append((checkpoint, seed, label, env_options))
        infos = [
            {"height_error": 0.1 - 0.08 * step / 10, "xy_error": 0.05 * (1 - step / 10), "is_success": False}
            for step in range(11)
        ]
        return EpisodeTrace.of(label, start_ee_z=0.2, infos=infos)

    monkeypatch.setattr(demo, "policy_episode_trace", policy_episode_trace)
    return calls


def test_demo_backbone_is_a_loadable_llava_checkpoint(tmp_path):
    directory = write_demo_backbone(tmp_path / "backbone")
    backbone = load_backbone(str(directory), load_weights=True)
    assert backbone.patch_grid == (8, 8)  # 64 px images in 8 px patches
    assert backbone.language_model.config.hidden_size == 128
    # Word-level: one token per word, each colour its own token, no unknown word in an instruction.
    tokenizer = backbone.tokenizer
    tokens = tokenizer("touch the top of the red block")["input_ids"]
    assert len(tokens) == 7 and tokenizer.unk_token_id not in tokens
    colours = {tokenizer(f"touch the top of the {c} block")["input_ids"][5] for c in PALETTE}
    assert len(colours) == len(PALETTE) and tokenizer.unk_token_id not in colours
    assert tokenizer("touch the purple block")["input_ids"][2] == tokenizer.unk_token_id
    # Written once: a second call keeps the same weights.
    before = backbone.language_model.embed_tokens.weight.clone()
    again = load_backbone(str(write_demo_backbone(directory)), load_weights=True)
    assert torch.equal(again.language_model.embed_tokens.weight, before)


def test_reference_success_rates_bracket_the_task():
    assert reference_success("expert", 10) == 100.0
    assert reference_success("random", 10) <= 10.0


def test_the_task_needs_depth_and_language():
    # An expert that lacks the heights, or does not know which block is named, mostly fails.
    assert reference_success("expert without depth", 40) <= 50.0
    assert reference_success("expert without language", 40) <= 50.0
    with pytest.raises(ValueError, match="policy must be one of"):
        reference_success("oracle", 1)


# Success rates the stubbed lerobot-eval reports, by `--env.success_target` (absent: the normal run).
STUB_RATES = {None: 40.0, "original": 10.0, "instruction": 70.0}


@pytest.fixture
def eval_calls(monkeypatch) -> list[list[str]]:
    """Replaces the demo's lerobot-eval runs by a stub; returns the argument lists it was given."""
    calls = []

    def run_lerobot(script, args, log_path):
        assert script == "lerobot_eval"
        calls.append(args)
        options = dict(arg.removeprefix("--").split("=", 1) for arg in args)
        output_dir = Path(options["output_dir"])
        output_dir.mkdir(parents=True)
        rate = STUB_RATES[options.get("env.success_target")]
        (output_dir / "eval_info.json").write_text(json.dumps({"overall": {"pc_success": rate}}))

    monkeypatch.setattr(demo, "run_lerobot", run_lerobot)
    return calls


@dataclass
class EvalCommandLine:
    env: EnvConfig


def env_config(args: list[str]) -> TouchBlockEnvConfig:
    """The env config lerobot-eval builds from the `--env.*` arguments."""
    return draccus.parse(EvalCommandLine, args=[arg for arg in args if arg.startswith("--env.")]).env


def test_one_block_policies_get_the_normal_evaluation_only(tmp_path, eval_calls):
    rates = evaluate_policy(tmp_path, Path("ckpt"), "depth", episodes=7, num_blocks=1)
    assert rates == {"llava3d_fusion (geometry=depth)": 40.0}
    assert eval_calls == [
        [
            "--policy.path=ckpt",
            "--env.type=touch_block",
            "--env.num_blocks=1",
            "--eval.n_episodes=7",
            "--eval.batch_size=10",
            f"--seed={demo.EVAL_START_SEED}",
            f"--output_dir={tmp_path / 'eval_depth'}",
        ]
    ]


def test_several_block_policies_are_also_evaluated_with_the_instruction_swapped(tmp_path, eval_calls):
    rates = evaluate_policy(tmp_path, Path("ckpt"), "none", episodes=7, num_blocks=3)
    assert rates == {
        "llava3d_fusion (geometry=none)": 40.0,
        "llava3d_fusion (geometry=none), instruction swapped, original target": 10.0,
        "llava3d_fusion (geometry=none), instruction swapped, new target": 70.0,
    }
    configs = [env_config(args) for args in eval_calls]
    assert [(c.num_blocks, c.instruction_perturbation, c.success_target) for c in configs] == [
        (3, "none", "original"),
        (3, "other_task", "original"),
        (3, "other_task", "instruction"),
    ]
    # Same policy, episodes and seeds; each run writes to its own folder.
    for args in eval_calls:
        assert {"--policy.path=ckpt", "--eval.n_episodes=7", f"--seed={demo.EVAL_START_SEED}"} <= set(args)
    assert len({args[-1] for args in eval_calls}) == 3


def test_rtc_option_repeats_every_evaluation_with_real_time_chunking(tmp_path, eval_calls):
    rates = evaluate_policy(tmp_path, Path("ckpt"), "depth", episodes=7, num_blocks=2, rtc=True)
    assert list(rates) == [
        "llava3d_fusion (geometry=depth)",
        "llava3d_fusion (geometry=depth), instruction swapped, original target",
        "llava3d_fusion (geometry=depth), instruction swapped, new target",
        "llava3d_fusion (geometry=depth), RTC",
        "llava3d_fusion (geometry=depth), RTC, instruction swapped, original target",
        "llava3d_fusion (geometry=depth), RTC, instruction swapped, new target",
    ]
    rtc_flag = "--policy.rtc_config.enabled=true"
    assert [rtc_flag in args for args in eval_calls] == [False] * 3 + [True] * 3
    assert len({args[-1] for args in eval_calls}) == 6  # each run in its own folder


@pytest.fixture
def stubbed_training(tmp_path, monkeypatch):
    """The demo's data, training and scripted references stubbed: a run only evaluates (policy
    checkpoint = the geometry's name, every reference 50 %)."""
    monkeypatch.setattr(
        demo,
        "prepare_demo_data",
        lambda workdir, blocks, episodes, every_block, near_target_starts, seed: (
            "data",
            tmp_path / "ds",
            tmp_path / "bb",
        ),
    )
    monkeypatch.setattr(
        demo,
        "train",
        lambda run_dir, dataset, backbone, geometry, steps, pretrained, batch_size, seed, save_freq, policy_options: (
            Path(geometry)
        ),
    )
    monkeypatch.setattr(demo, "reference_success", lambda policy, episodes, num_blocks, start_seed: 50.0)


def test_results_put_the_swapped_rates_next_to_the_normal_one(tmp_path, eval_calls, stubbed_training, capsys):
    demo.main(
        ["--workdir", str(tmp_path), "--num-blocks", "2", "--steps", "3", "--geometry", "depth", "none"]
    )

    results = json.loads((tmp_path / "data_3_steps_drop_last_6" / "results.json").read_text())
    assert results["num_blocks"] == 2
    swapped = ", instruction swapped, "
    assert list(results["success_rate_pc"].items()) == [
        *((policy, 50.0) for policy in demo.REFERENCE_POLICIES),
        *(
            item
            for geometry in ("depth", "none")
            for item in (
                (f"llava3d_fusion (geometry={geometry})", 40.0),
                (f"llava3d_fusion (geometry={geometry}){swapped}original target", 10.0),
                (f"llava3d_fusion (geometry={geometry}){swapped}new target", 70.0),
            )
        ),
    ]
    table = [line.split() for line in capsys.readouterr().err.splitlines() if line.endswith(" %")]
    assert [(" ".join(words[:-2]), float(words[-2])) for words in table] == list(
        results["success_rate_pc"].items()
    )


def test_vlm_pretraining_option_trains_the_policy_from_the_pretrained_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr(
        demo,
        "prepare_demo_data",
        lambda workdir, blocks, episodes, every_block, near_target_starts, seed: (
            "data",
            tmp_path / "ds",
            tmp_path / "bb",
        ),
    )
    pretrained = tmp_path / "backbone_pretrained"
    pretraining_calls, train_calls = [], []
    monkeypatch.setattr(
        demo,
        "pretrain_demo_backbone",
        lambda workdir, backbone, steps, images: (
            pretraining_calls.append((backbone, steps, images)) or pretrained
        ),
    )
    monkeypatch.setattr(
        demo,
        "train",
        lambda run_dir, dataset, backbone, geometry, steps, pretrained, batch_size, seed, save_freq, policy_options: (
            train_calls.append((backbone, pretrained)) or Path(geometry)
        ),
    )
    monkeypatch.setattr(
        demo, "evaluate_policy", lambda run_dir, checkpoint, geometry, episodes, blocks, rtc, start_seed: {}
    )
    monkeypatch.setattr(demo, "reference_success", lambda policy, episodes, num_blocks, start_seed: 50.0)
    demo.main(
        [
            "--workdir",
            str(tmp_path),
            "--steps",
            "3",
            "--vlm-pretraining-steps",
            "7",
            "--vlm-pretraining-images",
            "9",
        ]
    )

    assert pretraining_calls == [(tmp_path / "bb", 7, 9)]
    assert train_calls == [(pretrained, True)]
    results = json.loads((tmp_path / "data_3_steps_backbone_pretrained" / "results.json").read_text())
    assert (results["vlm_pretraining_steps"], results["vlm_pretraining_images"]) == (7, 9)


def test_pretrained_demo_backbone_is_written_once_and_loads(tmp_path):
    backbone = demo.write_demo_backbone(tmp_path / "backbone")
    output = demo.pretrain_demo_backbone(tmp_path, backbone, steps=2, images=3)
    record = json.loads((output / "pretraining.json").read_text())
    assert record["images"] == 3 and record["pairs"] >= 3 * 4  # >= 1 block: 2 per block + 2 per image
    loaded = load_backbone(str(output), load_weights=True)
    assert len(loaded.tokenizer) == len(build_word_tokenizer(demo.demo_vocabulary()))
    (output / "model.safetensors").unlink()
    assert (
        demo.pretrain_demo_backbone(tmp_path, backbone, steps=2, images=3) == output
    )  # reused, not retrained
    assert not (output / "model.safetensors").exists()


def test_every_block_as_target_option_records_each_scene_once_per_block(tmp_path, monkeypatch):
    recorded = []
    monkeypatch.setattr(demo, "make_touch_block_dataset", lambda **kwargs: recorded.append(kwargs))
    monkeypatch.setattr(demo, "write_demo_backbone", lambda directory: directory)
    plain = demo.prepare_demo_data(tmp_path, 3, 6)
    every_block = demo.prepare_demo_data(tmp_path, 3, 6, every_block_as_target=True)
    assert [call["every_block_as_target"] for call in recorded] == [False, True]
    assert plain[1] != every_block[1]  # its own dataset folder: never reused for the other setting


def test_near_target_starts_get_their_own_dataset_folder(tmp_path, monkeypatch):
    recorded = []
    monkeypatch.setattr(demo, "make_touch_block_dataset", lambda **kwargs: recorded.append(kwargs))
    monkeypatch.setattr(demo, "write_demo_backbone", lambda directory: directory)
    roots = [demo.prepare_demo_data(tmp_path, 1, 6, near_target_starts=f)[1] for f in (0.0, 0.25, 0.5)]
    assert [call["near_target_starts"] for call in recorded] == [0.0, 0.25, 0.5]
    assert len(set(roots)) == 3 and roots[1].name.endswith("_near_target_starts_0.25")


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], (1, 500, False, 0.25, 4800, None)),
        # Several blocks: the near-target starts come on top of 500 scenes x blocks, and each episode's
        # last 6 frames are left out of the samples.
        (["--num-blocks", "3"], (3, 2000, True, 0.25, 5600, {"drop_n_last_frames": 6})),
        (
            ["--num-blocks", "3", "--no-every-block-as-target"],
            (3, 667, False, 0.25, 5600, {"drop_n_last_frames": 6}),
        ),
        (
            ["--every-block-as-target", "--num-blocks", "2", "--episodes", "8", "--steps", "5"],
            (2, 8, True, 0.25, 5, {"drop_n_last_frames": 6}),
        ),
        (["--near-target-starts", "0"], (1, 500, False, 0.0, 4800, None)),
        (
            ["--num-blocks", "3", "--near-target-starts", "0"],
            (3, 1500, True, 0.0, 5600, {"drop_n_last_frames": 6}),
        ),
        (
            ["--num-blocks", "2", "--near-target-starts", "0.5"],
            (2, 2000, True, 0.5, 5600, {"drop_n_last_frames": 6}),
        ),
        (
            ["--num-blocks", "3", "--near-target-starts", "1"],
            (3, 1500, True, 1.0, 5600, {"drop_n_last_frames": 6}),
        ),
        (["--num-blocks", "3", "--drop-n-last-frames", "0"], (3, 2000, True, 0.25, 5600, None)),
        (["--drop-n-last-frames", "2"], (1, 500, False, 0.25, 4800, {"drop_n_last_frames": 2})),
    ],
)
def test_demo_defaults_that_depend_on_the_number_of_blocks(tmp_path, monkeypatch, argv, expected):
    data_calls, train_calls = [], []
    monkeypatch.setattr(
        demo,
        "prepare_demo_data",
        lambda workdir, blocks, episodes, every_block, near_target_starts, seed: (
            data_calls.append((blocks, episodes, every_block, near_target_starts))
            or ("data", tmp_path / "ds", tmp_path / "bb")
        ),
    )
    monkeypatch.setattr(
        demo,
        "train",
        lambda run_dir, dataset, backbone, geometry, steps, pretrained, batch_size, seed, save_freq, policy_options: (
            train_calls.append((steps, policy_options)) or Path(geometry)
        ),
    )
    monkeypatch.setattr(demo, "evaluate_policy", lambda *args: {})
    monkeypatch.setattr(demo, "reference_success", lambda policy, episodes, num_blocks, start_seed: 50.0)

    demo.main(["--workdir", str(tmp_path), *argv])

    *data_settings, steps, policy_options = expected
    assert data_calls == [tuple(data_settings)] and train_calls == [(steps, policy_options)]
    dropped = (policy_options or {}).get("drop_n_last_frames", 0)
    run_name = f"data_{steps}_steps" + (f"_drop_last_{dropped}" if dropped else "")
    results = json.loads((tmp_path / run_name / "results.json").read_text())
    recorded = ("num_blocks", "train_episodes", "every_block_as_target", "near_target_starts")
    assert tuple(results[key] for key in recorded) == tuple(data_settings)
    assert results["train_drop_n_last_frames"] == dropped


def test_training_decays_the_learning_rate_over_the_whole_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_lerobot", lambda script, args, log, environment: calls.append(args))
    demo.train(tmp_path, tmp_path / "ds", tmp_path / "bb", "depth", steps=9000, pretrained_backbone=False)
    assert {"--steps=9000", "--policy.scheduler_decay_steps=9000"} <= set(calls[0])


def test_batch_size_option_reaches_lerobot_train(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_lerobot", lambda script, args, log, environment: calls.append(args))
    demo.train(tmp_path / "a", tmp_path / "ds", tmp_path / "bb", "depth", 10, False)
    demo.train(tmp_path / "b", tmp_path / "ds", tmp_path / "bb", "depth", 10, False, batch_size=16)
    assert not any(arg.startswith("--batch_size") for arg in calls[0])  # the preset's batch
    assert "--batch_size=16" in calls[1]


def test_save_freq_option_keeps_intermediate_checkpoints_without_renaming_the_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_lerobot", lambda script, args, log, environment: calls.append(args))
    demo.train(tmp_path / "a", tmp_path / "ds", tmp_path / "bb", "depth", 10, False)
    demo.train(tmp_path / "b", tmp_path / "ds", tmp_path / "bb", "depth", 10, False, save_freq=4)
    assert "--save_freq=10" in calls[0] and "--save_freq=4" in calls[1]
    assert {arg for arg in calls[0] if not arg.startswith(("--save_freq", "--output_dir"))} == {
        arg for arg in calls[1] if not arg.startswith(("--save_freq", "--output_dir"))
    }


def test_non_positive_save_freq_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--workdir", str(tmp_path), "--save-freq", "0"])
    assert "--save-freq must be positive" in capsys.readouterr().err


def recorded_training(monkeypatch) -> list[tuple[str, dict]]:
    """Stubs the demo's training (checkpoint = the geometry's name) and evaluation; returns the list
    that each training call appends (run directory name, {"batch_size": ..., "policy_options": ...}) to."""
    calls = []

    def train(
        run_dir, dataset, backbone, geometry, steps, pretrained, batch_size, seed, save_freq, policy_options
    ):
        calls.append((run_dir.name, {"batch_size": batch_size, "policy_options": policy_options}))
        return Path(geometry)

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "evaluate_policy", lambda *args: {})
    return calls


def test_batch_size_option_names_the_run_and_is_recorded(tmp_path, monkeypatch, stubbed_training):
    calls = recorded_training(monkeypatch)
    demo.main(["--workdir", str(tmp_path), "--steps", "3"])
    demo.main(["--workdir", str(tmp_path), "--steps", "3", "--batch-size", "16"])
    train_calls = [(run_name, options["batch_size"]) for run_name, options in calls]
    assert train_calls == [("data_3_steps", None), ("data_3_steps_batch_16", 16)]
    for run_name, batch_size in (("data_3_steps", demo.PRESET_BATCH_SIZE), ("data_3_steps_batch_16", 16)):
        results = json.loads((tmp_path / run_name / "results.json").read_text())
        assert results["train_batch_size"] == batch_size


def test_drop_n_last_frames_option_reaches_lerobot_train_names_the_run_and_is_recorded(
    tmp_path, monkeypatch, stubbed_training
):
    calls = recorded_training(monkeypatch)
    demo.main(["--workdir", str(tmp_path), "--steps", "3"])
    demo.main(["--workdir", str(tmp_path), "--steps", "3", "--drop-n-last-frames", "6"])
    train_calls = [(run_name, options["policy_options"]) for run_name, options in calls]
    assert train_calls == [("data_3_steps", None), ("data_3_steps_drop_last_6", {"drop_n_last_frames": 6})]
    for run_name, dropped in (("data_3_steps", 0), ("data_3_steps_drop_last_6", 6)):
        results = json.loads((tmp_path / run_name / "results.json").read_text())
        assert results["train_drop_n_last_frames"] == dropped


def test_drop_n_last_frames_reaches_lerobot_train_as_a_policy_option(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_lerobot", lambda script, args, log, environment: calls.append(args))
    options = {"drop_n_last_frames": 6}
    demo.train(tmp_path, tmp_path / "ds", tmp_path / "bb", "depth", 10, False, policy_options=options)
    assert "--policy.drop_n_last_frames=6" in calls[0]


def test_negative_drop_n_last_frames_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--workdir", str(tmp_path), "--drop-n-last-frames", "-1"])
    assert "--drop-n-last-frames must be 0 or more" in capsys.readouterr().err


@pytest.mark.parametrize("geometry", ["depth", "none"])
def test_training_arguments_give_a_valid_policy_config_for_each_geometry(tmp_path, monkeypatch, geometry):
    calls = []
    monkeypatch.setattr(demo, "run_lerobot", lambda script, args, log, environment: calls.append(args))
    demo.train(tmp_path, tmp_path / "ds", tmp_path / "bb", geometry, steps=10, pretrained_backbone=False)
    fields = {k: v for k, v in json.loads(demo.PRESET.read_text())["policy"].items() if k != "type"}
    for arg in calls[0]:
        name, _, value = arg.removeprefix("--policy.").partition("=")
        if arg.startswith("--policy.") and name in ("geometry", "geometry_origin"):
            fields[name] = value
    config = Llava3DFusionConfig(**fields)  # raises on a combination lerobot-train would refuse
    assert config.geometry == geometry


def test_training_threads_leave_the_data_workers_their_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo.training_environment(num_workers=2, cpu_count=2)["OMP_NUM_THREADS"] == "1"
    assert demo.training_environment(num_workers=2, cpu_count=16)["OMP_NUM_THREADS"] == "14"
    assert demo.training_environment(num_workers=0, cpu_count=4)["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the caller's choice is kept
    assert demo.training_environment(num_workers=2, cpu_count=2)["OMP_NUM_THREADS"] == "3"
    # lerobot-train gets it, computed from the preset's DataLoader workers.
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    environments = []
    monkeypatch.setattr(
        demo, "run_lerobot", lambda script, args, log, environment: environments.append(environment)
    )
    demo.train(tmp_path, tmp_path / "ds", tmp_path / "bb", "depth", steps=10, pretrained_backbone=False)
    workers = json.loads(demo.PRESET.read_text())["num_workers"]
    assert environments[0]["OMP_NUM_THREADS"] == str(8 - workers)


def test_outcomes_option_reports_where_each_evaluation_ended(
    tmp_path, eval_calls, stubbed_training, monkeypatch
):
    outcome_calls = []

    def fake_outcomes(checkpoint, episodes, start_seed, **env_options):
        outcome_calls.append((checkpoint, episodes, start_seed, env_options))
        return OutcomeSummary.of(
            [{"is_success": False, "xy_error": 0.01, "height_error": -0.02, "nearest_block_is_target": True}],
            success_radius=0.015,
        )

    monkeypatch.setattr(demo, "touch_block_outcomes", fake_outcomes)
    demo.main(["--workdir", str(tmp_path), "--num-blocks", "2", "--steps", "3", "--episodes", "4",
               "--eval-episodes", "5", "--outcomes"])  # fmt: skip

    # The same episodes as each lerobot-eval run: seeds, blocks and instruction options.
    assert outcome_calls == [
        (Path("depth"), 5, demo.EVAL_START_SEED, {"num_blocks": 2, **env_options})
        for env_options in demo.instruction_evaluations(2).values()
    ]
    results = json.loads((tmp_path / "data_3_steps_drop_last_6" / "results.json").read_text())
    ended = results["where_episodes_ended"]
    assert list(ended) == [name for name in results["success_rate_pc"] if name.startswith("llava3d_fusion")]
    assert all(outcome["median_height_error_cm"] == -2.0 for outcome in ended.values())


def test_side_view_draws_one_episode_of_the_references_and_each_policy(policy_side_view):
    traces = demo.side_view_traces({"depth": Path("ckpt_depth")}, num_blocks=2)
    assert [trace.label for trace in traces] == [
        "expert",
        "expert without depth",
        "llava3d_fusion (geometry=depth)",
    ]
    assert policy_side_view == [
        (Path("ckpt_depth"), demo.EVAL_START_SEED, traces[2].label, {"num_blocks": 2})
    ]
    expert, no_depth = traces[:2]
    # The same scene: the same named block, the same start.
    assert expert.target_top_z == no_depth.target_top_z and expert.ee_z[0] == no_depth.ee_z[0]
    assert len(expert.ee_z) == len(expert.xy_error) == touch_block.DEFAULT_EPISODE_LENGTH + 1
    # The expert ends on the top; without depth it ends at the mid height it assumed, off the top.
    radius = TouchBlockEnvConfig.success_radius
    assert expert.success and abs(expert.ee_z[-1] - expert.target_top_z) <= radius
    assert no_depth.xy_error[-1] <= radius  # x/y is seen in the image, only the height was guessed
    assert no_depth.success == (abs(no_depth.ee_z[-1] - no_depth.target_top_z) <= radius)


def test_a_demo_run_writes_its_figures_next_to_the_results(tmp_path, eval_calls, stubbed_training, capsys):
    demo.main(
        ["--workdir", str(tmp_path), "--steps", "3", "--eval-episodes", "4", "--geometry", "depth", "none"]
    )

    run_dir = tmp_path / "data_3_steps"
    assert (run_dir / "results.json").is_file()
    for name in (SUCCESS_FIGURE, SIDE_VIEW_FIGURE):
        image = (run_dir / name).read_bytes()
        assert image.startswith(PNG_SIGNATURE) and len(image) > 10_000, name  # a drawn figure, not empty
    assert f"results.json, {SUCCESS_FIGURE}, {SIDE_VIEW_FIGURE}" in capsys.readouterr().err


def test_without_matplotlib_the_demo_says_how_to_get_its_figures(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    trace = EpisodeTrace.of("expert", 0.2, [{"height_error": 0.1, "xy_error": 0.0, "is_success": False}])
    assert write_demo_figures(tmp_path, {"expert": 100.0}, ("expert",), [trace], 0.015) == []
    assert "lerobot_policy_llava3d_fusion[demo]" in caplog.text
    assert not list(tmp_path.iterdir())


def test_policy_episode_trace_follows_one_lerobot_eval_episode_step_by_step(tmp_path):
    """An untrained checkpoint for touch_block's features, run as lerobot-eval runs it."""
    inputs = {
        "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 64, 64)),
        "observation.state": PolicyFeature(FeatureType.STATE, (3,)),
    }
    outputs = {"action": PolicyFeature(FeatureType.ACTION, (3,))}
    checkpoint = e2e.save_untrained_checkpoint(tmp_path / "untrained", inputs, outputs)
    steps = 6
    trace = policy_episode_trace(checkpoint, 1000, "untrained", num_blocks=2, episode_length=steps)

    env = gym.make(touch_block.GYM_ID, disable_env_checker=True, num_blocks=2).unwrapped
    observation, _ = env.reset(seed=1000)  # the same episode, as lerobot-eval seeds it
    assert trace.label == "untrained" and len(trace.ee_z) == len(trace.xy_error) == steps + 1
    assert trace.target_top_z == pytest.approx(float(env.target_position[2]))
    assert trace.ee_z[0] == pytest.approx(float(observation["agent_pos"][2]), abs=1e-6)
    start_xy_error = float(np.linalg.norm(env.target_position[:2] - env.ee_position[:2]))
    assert trace.xy_error[0] == pytest.approx(start_xy_error)
    # One action moves the end-effector by at most max_step along each axis, the last step included.
    moves = [abs(after - before) for before, after in zip(trace.ee_z, trace.ee_z[1:], strict=False)]
    assert max(moves) <= env.max_step + 1e-6


def test_seed_option_moves_the_training_scenes_the_training_seed_and_the_evaluation_episodes(
    tmp_path, monkeypatch, eval_calls, policy_side_view
):
    recorded, train_calls, reference_calls = [], [], []
    monkeypatch.setattr(demo, "make_touch_block_dataset", lambda **kwargs: recorded.append(kwargs))
    monkeypatch.setattr(demo, "write_demo_backbone", lambda directory: directory)
    run_eval = demo.run_lerobot  # the eval_calls stub

    def run_lerobot(script, args, log_path, environment=None):
        if script == "lerobot_train":
            train_calls.append(args)
        else:
            run_eval(script, args, log_path)

    monkeypatch.setattr(demo, "run_lerobot", run_lerobot)
    monkeypatch.setattr(
        demo,
        "reference_success",
        lambda policy, episodes, num_blocks, start_seed: reference_calls.append(start_seed) or 50.0,
    )
    monkeypatch.setattr(demo, "write_demo_figures", lambda *args, **kwargs: [])
    for seed in (0, 2):
        demo.main(["--workdir", str(tmp_path), "--steps", "3", "--episodes", "4", "--seed", str(seed)])

    # Seed 0 is the default run; seed 2 records other scenes into its own dataset and run folders.
    assert [call["seed"] for call in recorded] == [0, 2 * demo.SEED_STRIDE]
    assert recorded[0]["root"] != recorded[1]["root"]
    preset_seed = json.loads(demo.PRESET.read_text())["seed"]
    assert [[a for a in args if a.startswith("--seed=")] for args in train_calls] == [
        [f"--seed={preset_seed}"],
        [f"--seed={preset_seed + 2}"],
    ]
    first_eval_seed = demo.EVAL_START_SEED + 2 * demo.SEED_STRIDE
    assert f"--seed={demo.EVAL_START_SEED}" in eval_calls[0] and f"--seed={first_eval_seed}" in eval_calls[1]
    assert set(reference_calls) == {demo.EVAL_START_SEED, first_eval_seed}
    assert [call[1] for call in policy_side_view] == [demo.EVAL_START_SEED, first_eval_seed]
    run_dir = tmp_path / "1_blocks_4_episodes_near_target_starts_0.25_seed_2_3_steps"
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["seed"], results["eval_start_seed"], results["training_seed"]) == (
        2,
        first_eval_seed,
        preset_seed + 2,
    )
    # The training scenes never meet the evaluation's.
    training_scenes = range(recorded[1]["seed"], recorded[1]["seed"] + 4)
    assert not set(training_scenes) & set(range(first_eval_seed, first_eval_seed + 50))


def test_negative_seed_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--workdir", str(tmp_path), "--seed", "-1"])
    assert "--seed must be 0 or more" in capsys.readouterr().err
