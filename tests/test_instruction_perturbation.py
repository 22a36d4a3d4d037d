"""Tests of the instruction perturbations and of the wrapper that applies them to any env."""

from collections import Counter
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from lerobot.envs import make_env

from lerobot_llava3d_fusion.envs.configs import TouchBlockEnvConfig
from lerobot_llava3d_fusion.envs.instruction_perturbation import (
    PERTURBATIONS,
    InstructionPerturbationWrapper,
    perturb_instruction,
    shuffle_words,
)

INSTRUCTION = "put the bowl on the plate"
OTHERS = ("open the drawer", INSTRUCTION, "turn on the stove")


@pytest.mark.parametrize("seed", range(20))
def test_each_perturbation_produces_what_it_says(seed):
    rng = np.random.default_rng(seed)
    assert perturb_instruction(INSTRUCTION, "none", rng, OTHERS) == INSTRUCTION
    assert perturb_instruction(INSTRUCTION, "empty", rng, OTHERS) == ""
    other = perturb_instruction(INSTRUCTION, "other_task", rng, OTHERS)
    assert other in OTHERS and other != INSTRUCTION
    shuffled = perturb_instruction(INSTRUCTION, "shuffled", rng, OTHERS)
    assert shuffled != INSTRUCTION
    assert Counter(shuffled.split()) == Counter(INSTRUCTION.split())


def test_shuffling_changes_every_instruction_of_two_distinct_words():
    # Half of the permutations of two words are the identity: the shuffle must still change them.
    for seed in range(20):
        assert shuffle_words("open drawer", np.random.default_rng(seed)) == "drawer open"
    # With a single distinct word there is no other order.
    assert shuffle_words("go go go", np.random.default_rng(0)) == "go go go"
    assert shuffle_words("", np.random.default_rng(0)) == ""


def test_perturbations_are_deterministic_given_the_generator_and_use_all_choices():
    def draws(perturbation, seed):
        rng = np.random.default_rng(seed)
        return [perturb_instruction(INSTRUCTION, perturbation, rng, OTHERS) for _ in range(30)]

    for perturbation in PERTURBATIONS:
        assert draws(perturbation, 1) == draws(perturbation, 1)
    assert set(draws("other_task", 1)) == {"open the drawer", "turn on the stove"}
    assert len(set(draws("shuffled", 1))) > 5


def test_bad_perturbations_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="must be one of"):
        perturb_instruction(INSTRUCTION, "reversed", rng)
    with pytest.raises(ValueError, match="other_task needs an instruction other than"):
        perturb_instruction(INSTRUCTION, "other_task", rng, [INSTRUCTION])


class EpisodeInstructionEnv(gym.Env):
    """A dummy LeRobot-like env whose instruction changes with each reset (drawn from its seed)."""

    observation_space = spaces.Box(0.0, 1.0, (1,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.task_description = "none yet"

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.task_description = f"pick up the {self.np_random.choice(['red', 'blue', 'green'])} cube now"
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, False, False, {}


class EpisodeInstructionEnvWithTask(EpisodeInstructionEnv):
    task = "dummy_task"


def test_wrapper_overrides_task_description_and_task_per_episode():
    env = InstructionPerturbationWrapper(EpisodeInstructionEnvWithTask(), "shuffled")
    with pytest.raises(RuntimeError, match="reset"):
        env.task_description  # noqa: B018
    for seed in range(5):
        env.reset(seed=seed)
        original = env.unwrapped.task_description
        assert env.task_description != original
        assert Counter(env.task_description.split()) == Counter(original.split())
        assert env.task == env.task_description
        assert env.unwrapped.task == "dummy_task"

    # LeRobot's eval reads the instruction through the vector env: it gets the wrapper's.
    vec = gym.vector.SyncVectorEnv(
        [lambda: InstructionPerturbationWrapper(EpisodeInstructionEnvWithTask(), "empty") for _ in range(2)]
    )
    vec.reset(seed=[0, 1])
    assert vec.call("task_description") == ("", "")
    assert vec.call("task") == ("", "")
    vec.close()


def test_wrapper_draws_other_tasks_reproducibly_from_the_reset_seed():
    others = ["open the drawer", "turn on the stove", "pick up the red cube now"]

    def instructions(env):
        drawn = []
        for seed in range(10):
            env.reset(seed=seed)
            assert env.task_description != env.unwrapped.task_description
            drawn.append(env.task_description)
        return drawn

    first = instructions(
        InstructionPerturbationWrapper(EpisodeInstructionEnv(), "other_task", others, seed=3)
    )
    again = instructions(
        InstructionPerturbationWrapper(EpisodeInstructionEnv(), "other_task", others, seed=7)
    )
    assert first == again  # the reset seeds decide, not the construction seed
    assert set(first) <= set(others) and len(set(first)) > 1


def test_wrapper_has_no_task_when_the_env_has_none_and_rejects_bad_arguments():
    env = InstructionPerturbationWrapper(EpisodeInstructionEnv(), "empty")
    env.reset(seed=0)
    assert env.task_description == ""
    with pytest.raises(AttributeError):
        env.get_wrapper_attr("task")
    with pytest.raises(ValueError, match="must be one of"):
        InstructionPerturbationWrapper(EpisodeInstructionEnv(), "upside_down")
    with pytest.raises(ValueError, match="other_instructions"):
        InstructionPerturbationWrapper(EpisodeInstructionEnv(), "other_task")


@dataclass
class WrappedTouchBlockConfig(TouchBlockEnvConfig):
    """An env config whose `create_envs` wraps its envs, as the README shows for any LeRobot env."""

    def create_envs(self, n_envs, use_async_envs=False):
        def make_one():
            env = gym.make(self.gym_id, disable_env_checker=True, **self.gym_kwargs)
            return InstructionPerturbationWrapper(env, "shuffled")

        return {"touch_block": {0: gym.vector.SyncVectorEnv([make_one for _ in range(n_envs)])}}


def test_wrapped_envs_made_by_lerobot_give_the_perturbed_instruction():
    vec = make_env(WrappedTouchBlockConfig(), n_envs=2)["touch_block"][0]
    try:
        vec.reset(seed=[0, 1])
        for instruction, env in zip(vec.call("task_description"), vec.envs, strict=True):
            original = env.unwrapped.task_description
            assert original.startswith("touch the top of the ")
            assert instruction != original and Counter(instruction.split()) == Counter(original.split())
    finally:
        vec.close()
