"""Bad inputs and faults as users hit them, through the policy's own surface: the preprocessor, then
`predict_action_chunk` / `select_action` / `forward`, and config construction (also through
lerobot-train's parser). Each is refused with an error that names the offending key or field, or is
handled correctly (and then the test says what correct is). Nothing is silently accepted.

Related cases elsewhere: test_policy.py (missing camera, wrong sizes, NaN), test_policy_geometry.py
(normalised or mis-sized camera matrices, NaN depth), test_geometry_sources.py and
test_robot_depth.py (depth units).
"""

import inspect
import logging
import math
import re
import sys

import pytest
import torch
from helpers import CAMERAS, CHUNK, fixed_noise, raw_batch, tiny_config, tiny_policy
from lerobot.configs import parser
from lerobot.configs.train import TrainPipelineConfig
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE
from test_policy_geometry import INTRINSICS, geometry_policy, with_depth

from lerobot_llava3d_fusion import make_llava3d_fusion_pre_post_processors
from lerobot_llava3d_fusion.model.inputs import MAX_CAMERA_TRANSLATION
from lerobot_llava3d_fusion.observation_keys import GEOMETRY_ORIGIN

TOP, WRIST = CAMERAS
DEPTH_TOP, DEPTH_WRIST = "observation.depth.top", "observation.depth.wrist"
INTRINSICS_TOP, EXTRINSICS_TOP = "observation.intrinsics.top", "observation.extrinsics.top"
ACTION_IS_PAD = "action_is_pad"
POSE = [[1.0, 0.0, 0.0, 0.3], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.2], [0.0, 0.0, 0.0, 1.0]]
PACKAGE_LOGGER = "lerobot_llava3d_fusion"


# ------------------------------------------------------------------------------------- fixtures


class Subject:
    """One tiny policy, its preprocessor and a clean preprocessed batch of 2 samples."""

    def __init__(self, policy, raw: dict):
        self.policy = policy
        self.preprocessor, _ = make_llava3d_fusion_pre_post_processors(policy.config, dataset_stats=None)
        self.clean = self.preprocessor(raw)

    def batch(self, **replaced) -> dict:
        """A copy of the clean batch with some keys replaced (None removes the key)."""
        batch = dict(self.clean)
        for key, value in replaced.items():
            key = key.replace("__", ".")
            if value is None:
                del batch[key]
            else:
                batch[key] = value
        return batch


@pytest.fixture(scope="module")
def plain():
    return Subject(tiny_policy(), raw_batch())


@pytest.fixture(scope="module")
def depth():
    """Recorded depth for both cameras, 3D points measured from the state position, per-frame
    intrinsics and extrinsics in the batch for the top camera."""
    policy = geometry_policy(geometry_origin="state")
    raw = with_depth(raw_batch())
    raw[INTRINSICS_TOP] = torch.tensor(INTRINSICS).expand(2, 3, 3).clone()
    raw[EXTRINSICS_TOP] = torch.tensor(POSE).expand(2, 4, 4).clone()
    return Subject(policy, raw)


def run(subject: Subject, batch: dict, surface: str) -> torch.Tensor:
    """Call the policy as LeRobot does: `predict` / `select` (lerobot-eval) or `forward` (lerobot-train)."""
    policy = subject.policy
    if surface == "forward":
        return policy.forward(batch)[0]
    batch_size = batch[OBS_LANGUAGE_TOKENS].shape[0]
    if surface == "select":
        policy.reset()
        return policy.select_action(batch, noise=fixed_noise(policy, batch_size))
    return policy.predict_action_chunk(batch, noise=fixed_noise(policy, batch_size))


def resized(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`tensor` with `batch_size` samples (its own, repeated)."""
    return torch.cat([tensor] * batch_size)[:batch_size].clone()


# ------------------------------------------------------------------------------ one batch size


OBSERVATION_KEYS = [TOP, WRIST, OBS_STATE, OBS_LANGUAGE_TOKENS, OBS_LANGUAGE_ATTENTION_MASK]


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize(
    "key, surface",
    [(key, surface) for key in OBSERVATION_KEYS for surface in ("predict", "forward")]
    + [(ACTION, "forward"), (ACTION_IS_PAD, "forward")],
)
def test_inputs_with_another_batch_size_are_refused_naming_them(plain, key, surface, batch_size):
    value = plain.clean[key] if key != ACTION_IS_PAD else torch.zeros(2, CHUNK, dtype=torch.bool)
    batch = plain.batch(**{key: resized(value, batch_size)})
    with pytest.raises(ValueError, match=rf"disagree on the batch size \(.*{re.escape(key)}: {batch_size}"):
        run(plain, batch, surface)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("key", [DEPTH_TOP, DEPTH_WRIST, INTRINSICS_TOP, EXTRINSICS_TOP, GEOMETRY_ORIGIN])
def test_geometry_inputs_with_another_batch_size_are_refused_naming_them(depth, key, batch_size):
    batch = depth.batch(**{key: resized(depth.clean[key], batch_size)})
    with pytest.raises(ValueError, match=rf"disagree on the batch size \(.*{re.escape(key)}: {batch_size}"):
        run(depth, batch, "predict")


@pytest.mark.parametrize("tasks", [["pick"], ["pick", "place", "push"], "pick up the red block"])
def test_a_task_list_of_another_length_than_the_images_is_refused(plain, tasks):
    raw = raw_batch()
    raw["task"] = tasks
    batch = plain.preprocessor(raw)
    with pytest.raises(
        ValueError, match=rf"{OBS_LANGUAGE_TOKENS}: {1 if isinstance(tasks, str) else len(tasks)}"
    ):
        run(plain, batch, "predict")


@pytest.mark.parametrize("surface", ["predict", "select", "forward"])
def test_an_empty_batch_is_refused(plain, surface):
    batch = {
        key: value[:0] if isinstance(value, torch.Tensor) else value for key, value in plain.clean.items()
    }
    with pytest.raises(ValueError, match="batch size 0"):
        run(plain, batch, surface)


def test_an_empty_geometry_batch_is_refused(depth):
    batch = {
        key: value[:0] if isinstance(value, torch.Tensor) else value for key, value in depth.clean.items()
    }
    with pytest.raises(ValueError, match="batch size 0"):
        run(depth, batch, "predict")


@pytest.mark.parametrize(
    "key, unbatched",
    [
        (OBS_STATE, lambda v: v[0]),
        (TOP, lambda v: v[0]),
        (WRIST, lambda v: v[0]),
        (OBS_LANGUAGE_ATTENTION_MASK, lambda v: v[0]),
        (DEPTH_TOP, lambda v: v[0, 0]),
        (GEOMETRY_ORIGIN, lambda v: v[0]),
    ],
)
def test_an_input_without_its_batch_dimension_is_refused(plain, depth, key, unbatched):
    subject = depth if key in (DEPTH_TOP, GEOMETRY_ORIGIN) else plain
    batch = subject.batch(**{key: unbatched(subject.clean[key])})
    with pytest.raises(ValueError, match=rf"{re.escape(key)} has shape .*without a batch dimension"):
        run(subject, batch, "predict")


def test_an_unbatched_observation_gets_its_batch_dimension_from_the_preprocessor(plain):
    raw = raw_batch(batch_size=1)
    single = {key: value[0] if isinstance(value, torch.Tensor) else value for key, value in raw.items()}
    single["task"] = raw["task"][0]
    del single[ACTION]
    actions = run(plain, plain.preprocessor(single), "predict")
    expected = run(plain, plain.preprocessor(raw), "predict")
    torch.testing.assert_close(actions, expected)


@pytest.mark.parametrize("key", [INTRINSICS_TOP, EXTRINSICS_TOP])
def test_one_camera_matrix_for_the_whole_batch_broadcasts(depth, key):
    actions = run(depth, depth.batch(**{key: depth.clean[key][0]}), "predict")
    torch.testing.assert_close(actions, run(depth, depth.batch(), "predict"))


@pytest.mark.parametrize(
    "noise_shape", [(1, CHUNK, 4), (3, CHUNK, 4), (2, CHUNK + 1, 4), (2, CHUNK, 3), (2, CHUNK)]
)
@pytest.mark.parametrize("surface", ["predict", "forward"])
def test_noise_of_the_wrong_shape_is_refused(plain, surface, noise_shape):
    noise = torch.zeros(noise_shape)
    call = plain.policy.forward if surface == "forward" else plain.policy.predict_action_chunk
    with pytest.raises(ValueError, match=rf"noise: expected shape \(2, {CHUNK}, 4\)"):
        call(plain.batch(), noise=noise)


@pytest.mark.parametrize("time_shape", [(3,), (2, 1), ()])
def test_training_times_of_the_wrong_shape_are_refused(plain, time_shape):
    with pytest.raises(ValueError, match=r"time: expected shape \(2,\)"):
        plain.policy.forward(plain.batch(), time=torch.full(time_shape, 0.5))


@pytest.mark.parametrize("sizes", [(2, 3), (2, 1), (3, 2)])
def test_select_action_starts_a_new_chunk_when_the_batch_size_changes(plain, monkeypatch, caplog, sizes):
    policy = plain.policy
    monkeypatch.setattr(policy, "_warned_batch_size_change", False)
    first, second = (plain.preprocessor(raw_batch(n, tasks=["pick"] * n)) for n in sizes)
    policy.reset()
    policy.select_action(first, noise=fixed_noise(policy, sizes[0]))
    with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
        action = policy.select_action(second, noise=fixed_noise(policy, sizes[1]))
        policy.select_action(first, noise=fixed_noise(policy, sizes[0]))  # another change: no second warning
    expected = policy.predict_action_chunk(second, noise=fixed_noise(policy, sizes[1]))[:, 0]
    torch.testing.assert_close(action, expected)
    warnings = [r.getMessage() for r in caplog.records if "select_action" in r.getMessage()]
    assert len(warnings) == 1 and f"batch size {sizes[1]}" in warnings[0]


# -------------------------------------------------------------------------------------- images


IMAGE_FAULTS = {
    "uint8": (lambda image: (image * 255).to(torch.uint8), "torch.uint8"),
    "int64": (lambda image: (image * 255).long(), "torch.int64"),
    "0..255 floats": (lambda image: image * 255, r"values in \[.*, .*\].*divide by 255"),
    "[-1, 1] floats": (lambda image: image * 2 - 1, r"values in \[-.*\].*undo the normalisation"),
    "overexposed": (lambda image: image * 1.5, r"values in \[.*, 1\.\d+\]"),
    "slightly negative": (lambda image: image - 0.01, r"values in \[-0\.0.*\]"),
}


@pytest.mark.parametrize("surface", ["predict", "forward"])
@pytest.mark.parametrize("fault", list(IMAGE_FAULTS))
@pytest.mark.parametrize("key", CAMERAS)
def test_images_outside_float_0_1_are_refused_naming_the_key_and_range(plain, key, fault, surface):
    transform, message = IMAGE_FAULTS[fault]
    batch = plain.batch(**{key: transform(plain.clean[key])})
    with pytest.raises(ValueError, match=rf"{re.escape(key)} (is|has) .*{message}") as error:
        run(plain, batch, surface)
    assert "float images in [0, 1]" in str(error.value)


@pytest.mark.parametrize(
    "image", [lambda x: torch.zeros_like(x), lambda x: torch.ones_like(x), lambda x: x.double()]
)
def test_images_at_the_ends_of_0_1_and_in_float64_are_accepted(plain, image):
    actions = run(plain, plain.batch(**{TOP: image(plain.clean[TOP])}), "predict")
    assert torch.isfinite(actions).all()


# --------------------------------------------------------------------------------------- depth


def _all(value):
    return lambda depth: torch.full_like(depth, value)


def _sample(index, value):
    def fault(depth):
        depth = depth.clone()
        depth[index] = value
        return depth

    return fault


UNUSABLE_DEPTH = {
    "all zero": _all(0.0),
    "all negative": _all(-1.0),
    "all +inf": _all(math.inf),
    "all -inf": _all(-math.inf),
    "one sample zero": _sample(1, 0.0),
    "one sample negative": _sample(0, -0.5),
}
MIS_SCALED_DEPTH = {
    "all beyond geometry_max_depth": _all(20.0),
    "one sample in millimetres": lambda depth: torch.cat([depth[:1], depth[1:] * 1000]),
}


@pytest.mark.parametrize("fault", list(UNUSABLE_DEPTH))
@pytest.mark.parametrize("key", [DEPTH_TOP, DEPTH_WRIST])
def test_a_depth_map_without_a_usable_pixel_is_refused_by_default(depth, key, fault):
    batch = depth.batch(**{key: UNUSABLE_DEPTH[fault](depth.clean[key])})
    with pytest.raises(
        ValueError, match=rf"{re.escape(key)}: sample\(s\) \[.*\] have no usable depth.*allow_missing_depth"
    ):
        run(depth, batch, "predict")


@pytest.mark.parametrize("fault", list(MIS_SCALED_DEPTH))
@pytest.mark.parametrize("allow_missing_depth", [False, True])
@pytest.mark.parametrize("key", [DEPTH_TOP, DEPTH_WRIST])
def test_depth_in_the_wrong_unit_is_refused_even_in_one_sample(
    depth, monkeypatch, key, allow_missing_depth, fault
):
    monkeypatch.setattr(depth.policy.config, "allow_missing_depth", allow_missing_depth)
    batch = depth.batch(**{key: MIS_SCALED_DEPTH[fault](depth.clean[key])})
    with pytest.raises(
        ValueError, match=rf"{re.escape(key)}: in sample\(s\) \[.*beyond geometry_max_depth.*metres"
    ):
        run(depth, batch, "predict")


def test_metres_in_one_sample_of_a_millimetre_training_batch_are_refused(depth, monkeypatch):
    monkeypatch.setattr(depth.policy.config, "dataset_depth_unit", "mm")
    millimetres = depth.clean[DEPTH_TOP] * 1000
    batch = depth.batch(
        **{
            DEPTH_TOP: torch.cat([millimetres[:1], depth.clean[DEPTH_TOP][1:]]),
            DEPTH_WRIST: depth.clean[DEPTH_WRIST] * 1000,
        }
    )
    with pytest.raises(ValueError, match=r"observation.depth.top: read as millimetres.*sample\(s\) \[1\]"):
        run(depth, batch, "forward")


@pytest.mark.parametrize(
    "fault, missing", [("all zero", 2), ("all +inf", 2), ("all negative", 2), ("one sample zero", 1)]
)
def test_allow_missing_depth_accepts_dropped_frames_with_a_warning_and_a_count(
    depth, monkeypatch, caplog, fault, missing
):
    monkeypatch.setattr(depth.policy.config, "allow_missing_depth", True)
    counts = depth.policy._batch_to_inputs.missing_depth_frames
    counts.clear()
    batch = depth.batch(**{DEPTH_TOP: UNUSABLE_DEPTH[fault](depth.clean[DEPTH_TOP])})
    with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
        assert torch.isfinite(run(depth, batch, "predict")).all()
        run(depth, batch, "predict")
    assert counts == {DEPTH_TOP: 2 * missing}
    assert any(
        f"{DEPTH_TOP}: no usable depth pixel in {missing} frame(s)" in r.getMessage() for r in caplog.records
    )


# ---------------------------------------------------------------------------------- extrinsics


def _pose(rotation=None, translation=(0.3, 0.0, 1.2)) -> torch.Tensor:
    pose = torch.eye(4)
    if rotation is not None:
        pose[:3, :3] = torch.tensor(rotation)
    pose[:3, 3] = torch.tensor(translation)
    return pose


REFLECTIONS = {
    "x flipped": [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    "z flipped": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]],
    "x and y swapped": [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
    "point reflection": [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]],
}
FAR_TRANSLATIONS = {
    "millimetres": (300.0, 0.0, 1200.0),
    "60 m": (60.0, 0.0, 0.0),
    "51 m below": (0.0, 0.0, -51.0),
}


def _with_extrinsics(subject, monkeypatch, pose: torch.Tensor, source: str) -> dict:
    """The batch with the top camera's extrinsics `pose`, per frame or from the config."""
    if source == "batch":
        return subject.batch(**{EXTRINSICS_TOP: pose.expand(2, 4, 4).clone()})
    monkeypatch.setitem(subject.policy.config.camera_extrinsics, "top", pose.tolist())
    return subject.batch(**{EXTRINSICS_TOP: None})


@pytest.mark.parametrize("source", ["batch", "config"])
@pytest.mark.parametrize("reflection", list(REFLECTIONS))
def test_a_reflection_is_refused_as_extrinsics(depth, monkeypatch, reflection, source):
    batch = _with_extrinsics(depth, monkeypatch, _pose(REFLECTIONS[reflection]), source)
    with pytest.raises(
        ValueError, match=r"observation.extrinsics.top has a rotation with determinant -1.*reflection"
    ):
        run(depth, batch, "predict")


@pytest.mark.parametrize("source", ["batch", "config"])
@pytest.mark.parametrize("translation", list(FAR_TRANSLATIONS))
def test_a_translation_beyond_the_bound_is_taken_for_millimetres(depth, monkeypatch, translation, source):
    batch = _with_extrinsics(depth, monkeypatch, _pose(translation=FAR_TRANSLATIONS[translation]), source)
    with pytest.raises(
        ValueError,
        match=rf"observation.extrinsics.top puts the camera .* m .*{MAX_CAMERA_TRANSLATION:g} m.*millimetres",
    ):
        run(depth, batch, "predict")


def test_a_reflection_in_one_sample_is_refused(depth):
    poses = torch.stack([_pose(), _pose(REFLECTIONS["z flipped"])])
    with pytest.raises(ValueError, match="observation.extrinsics.top has a rotation with determinant"):
        run(depth, depth.batch(**{EXTRINSICS_TOP: poses}), "predict")


def test_a_camera_within_the_bound_is_accepted(depth, monkeypatch):
    far = _with_extrinsics(
        depth, monkeypatch, _pose(translation=(0.0, MAX_CAMERA_TRANSLATION - 1, 0.0)), "batch"
    )
    assert torch.isfinite(run(depth, far, "predict")).all()


# ---------------------------------------------------------------------------------------- state


@pytest.mark.parametrize(
    "key, value, message",
    [
        (OBS_STATE, torch.zeros(2, 1, 5), r"observation.state: expected shape \(B, 5\), got \(2, 1, 5\)"),
        (GEOMETRY_ORIGIN, torch.zeros(2, 2), r"observation.geometry_origin: expected shape \(2, 3\)"),
        (GEOMETRY_ORIGIN, torch.full((2, 3), math.nan), "observation.geometry_origin contains NaN"),
        (INTRINSICS_TOP, torch.full((2, 3, 3), math.inf), "observation.intrinsics.top contains NaN or inf"),
    ],
)
def test_state_and_origin_faults_name_their_key(depth, key, value, message):
    with pytest.raises(ValueError, match=message):
        run(depth, depth.batch(**{key: value}), "predict")


# ----------------------------------------------------------------------------------------- task


@pytest.mark.parametrize(
    "task, error, message",
    [
        (None, KeyError, "'task' missing from the batch"),
        (3, TypeError, "'task' must be a string or a list of strings.*int"),
        ([1, 2], TypeError, "'task' must be a string or a list of strings.*list"),
        ({"text": "pick"}, TypeError, "'task' must be a string or a list of strings.*dict"),
        (b"pick", TypeError, "'task' must be a string or a list of strings.*bytes"),
    ],
)
def test_a_missing_or_malformed_task_is_refused_naming_task(plain, task, error, message):
    raw = raw_batch()
    if task is None:
        del raw["task"]
    else:
        raw["task"] = task
    with pytest.raises(error, match=message):
        plain.preprocessor(raw)


@pytest.mark.parametrize("words", [60, 5000])
def test_an_over_long_task_warns_once_with_the_numbers(plain, caplog, words):
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(plain.policy.config, dataset_stats=None)
    limit = plain.policy.config.tokenizer_max_length
    raw = raw_batch(tasks=["pick " * words, "push"])
    with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
        batch = preprocessor(raw)
        preprocessor(raw)
    warnings = [r.getMessage() for r in caplog.records if "tokenizer_max_length" in r.getMessage()]
    assert len(warnings) == 1
    found = int(re.search(r"a task of (\d+) tokens", warnings[0]).group(1))
    assert found > words and f"tokenizer_max_length={limit}" in warnings[0]
    assert batch[OBS_LANGUAGE_TOKENS].shape[1] == limit


def test_a_task_that_fits_does_not_warn(plain, caplog):
    preprocessor, _ = make_llava3d_fusion_pre_post_processors(plain.policy.config, dataset_stats=None)
    with caplog.at_level(logging.WARNING, logger=PACKAGE_LOGGER):
        preprocessor(raw_batch(tasks=["pick up the red block", "push"]))
    assert not [r for r in caplog.records if "tokenizer_max_length" in r.getMessage()]


# --------------------------------------------------------------------------------------- config


BAD_TRAINING_PRESETS = [
    ("optimizer_lr", -1.0),
    ("optimizer_lr", 0.0),
    ("optimizer_lr", math.nan),
    ("optimizer_lr", math.inf),
    ("optimizer_weight_decay", -0.1),
    ("optimizer_weight_decay", math.nan),
    ("optimizer_weight_decay", math.inf),
    ("optimizer_betas", (1.0, 0.95)),
    ("optimizer_betas", (0.9, 1.0)),
    ("optimizer_betas", (-0.1, 0.95)),
    ("optimizer_betas", (math.nan, 0.95)),
    ("optimizer_eps", 0.0),
    ("optimizer_eps", -1e-8),
    ("optimizer_eps", math.nan),
    ("optimizer_grad_clip_norm", 0.0),
    ("optimizer_grad_clip_norm", -1.0),
    ("optimizer_grad_clip_norm", math.nan),
    ("scheduler_warmup_steps", -1),
    ("scheduler_decay_steps", 0),
    ("scheduler_decay_steps", -5),
    ("scheduler_decay_lr", -1e-6),
    ("scheduler_decay_lr", math.nan),
    ("scheduler_decay_lr", math.inf),
]


@pytest.mark.parametrize("field, value", BAD_TRAINING_PRESETS)
def test_invalid_optimizer_and_scheduler_fields_fail_at_construction(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        tiny_config(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("scheduler_warmup_steps", 0),
        ("optimizer_grad_clip_norm", math.inf),
        ("optimizer_weight_decay", 0.0),
        ("scheduler_decay_lr", 0.0),
        ("optimizer_betas", (0.0, 0.0)),
    ],
)
def test_edge_values_of_the_training_presets_build_a_working_schedule(field, value):
    config = tiny_config(**{field: value})
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = config.get_optimizer_preset().build([weight])
    scheduler = config.get_scheduler_preset().build(optimizer, num_training_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert math.isfinite(optimizer.param_groups[0]["lr"]) and optimizer.param_groups[0]["lr"] >= 0


@parser.wrap()
def _parse_like_lerobot_train(cfg: TrainPipelineConfig) -> TrainPipelineConfig:
    return cfg


def _lerobot_train_argv(*policy_args: str) -> list[str]:
    return ["lerobot-train", "--policy.type=llava3d_fusion", "--dataset.repo_id=user/data", *policy_args]


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--policy.optimizer_lr=-1", "optimizer_lr must be a finite number > 0"),
        ("--policy.optimizer_lr=nan", "optimizer_lr must be a finite number > 0"),
        ("--policy.scheduler_decay_steps=0", "scheduler_decay_steps must be >= 1"),
        ("--policy.scheduler_decay_lr=-0.1", "scheduler_decay_lr must be a finite number >= 0"),
        ("--policy.geometry=lidar", "geometry must be one of"),
        ("--policy.num_steps=0", "num_steps"),
        ("--policy.drop_n_last_frames=-1", "drop_n_last_frames must be >= 0"),
    ],
)
def test_lerobot_train_shows_the_invalid_fields_own_message(monkeypatch, capsys, caplog, arg, message):
    monkeypatch.setattr(sys, "argv", _lerobot_train_argv(arg))
    with caplog.at_level(logging.ERROR, logger=PACKAGE_LOGGER), pytest.raises(SystemExit):
        _parse_like_lerobot_train()
    assert "Couldn't instantiate class Llava3DFusionConfig" in capsys.readouterr().err  # draccus' own line
    assert message in caplog.text  # ... preceded by the field's message


def test_lerobot_train_parses_valid_training_presets(monkeypatch):
    monkeypatch.setattr(
        sys, "argv", _lerobot_train_argv("--policy.optimizer_lr=3e-4", "--policy.scheduler_warmup_steps=0")
    )
    cfg = _parse_like_lerobot_train()
    assert (cfg.policy.optimizer_lr, cfg.policy.scheduler_warmup_steps) == (3e-4, 0)
    assert not cfg.policy.allow_missing_depth


def test_drop_n_last_frames_reaches_lerobot_trains_sampler(monkeypatch):
    from lerobot.datasets import EpisodeAwareSampler
    from lerobot.scripts import lerobot_train

    monkeypatch.setattr(sys, "argv", _lerobot_train_argv("--policy.drop_n_last_frames=2"))
    cfg = _parse_like_lerobot_train()
    assert cfg.trainable_config.drop_n_last_frames == 2
    # lerobot-train reads the attribute from the config it trains when it builds its sampler.
    assert 'getattr(active_cfg, "drop_n_last_frames", 0)' in inspect.getsource(lerobot_train.train)
    # Two episodes of 5 and 3 frames: frames 0-2 and 5 remain samples.
    sampler = EpisodeAwareSampler([0, 5], [5, 8], drop_n_last_frames=cfg.trainable_config.drop_n_last_frames)
    assert sorted(sampler) == [0, 1, 2, 5]
