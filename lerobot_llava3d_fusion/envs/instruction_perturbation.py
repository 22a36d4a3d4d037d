"""Replacing an env's instruction at evaluation time, to measure how much a policy listens to it.

Perturbations (`PERTURBATIONS`), each deterministic given a numpy `Generator`:

* ``none``: the instruction unchanged;
* ``other_task``: the instruction of another task (one of ``other_instructions`` that differs from
  the original, drawn uniformly);
* ``shuffled``: the instruction's words in a random order, always different from the original when
  it has at least two distinct words;
* ``empty``: ``""``.

The env types of this package take ``--env.instruction_perturbation=<name>`` themselves
(``touch_block``, ``libero_rgbd``). :class:`InstructionPerturbationWrapper` does the same for any
gymnasium env that exposes ``task_description`` as LeRobot's envs do: LeRobot's ``lerobot-eval``
reads the instruction with ``env.call("task_description")``, which finds the wrapper's attribute
before the wrapped env's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

PERTURBATIONS = ("none", "other_task", "shuffled", "empty")
# Mixed into the wrapper's seeds so that its draws are not those of a wrapped env seeded alike.
_WRAPPER_STREAM = 0x5EED


def check_perturbation(perturbation: str) -> None:
    """Raises a ValueError naming the choices if `perturbation` is not one of `PERTURBATIONS`."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"instruction_perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")


def shuffle_words(instruction: str, rng: np.random.Generator) -> str:
    """The words of `instruction` in a random order, different from the original order whenever
    the instruction has at least two distinct words (else the instruction itself)."""
    words = instruction.split()
    shuffled = [words[i] for i in rng.permutation(len(words))]
    if shuffled == words:
        # Rotating by one changes a sequence unless all its words are equal.
        shuffled = words[1:] + words[:1]
    return " ".join(shuffled)


def other_instruction(instruction: str, other_instructions: Sequence[str], rng: np.random.Generator) -> str:
    """One of `other_instructions` that differs from `instruction`, drawn uniformly."""
    candidates = sorted(set(other_instructions) - {instruction})
    if not candidates:
        raise ValueError(f"other_task needs an instruction other than {instruction!r}; none was given")
    return candidates[int(rng.integers(len(candidates)))]


def perturb_instruction(
    instruction: str,
    perturbation: str,
    rng: np.random.Generator,
    other_instructions: Sequence[str] = (),
) -> str:
    """`instruction` after `perturbation` (see the module docstring).

    Args:
        other_instructions: the instructions `other_task` draws from (the original may be among them).
    """
    check_perturbation(perturbation)
    if perturbation == "other_task":
        return other_instruction(instruction, other_instructions, rng)
    if perturbation == "shuffled":
        return shuffle_words(instruction, rng)
    if perturbation == "empty":
        return ""
    return instruction


class InstructionPerturbationWrapper(gym.Wrapper):
    """Replaces the wrapped env's ``task_description`` (and ``task``, if it has one) by a perturbed
    instruction, drawn anew at every reset from the instruction the env then gives.

    Any LeRobot env that exposes ``task_description`` can be wrapped, e.g. in a custom
    ``EnvConfig.create_envs``::

        def make_one():
            env = gym.make(self.gym_id, disable_env_checker=True, **self.gym_kwargs)
            return InstructionPerturbationWrapper(env, "shuffled", seed=0)

    The draw uses the wrapper's own generator (the wrapped env's random stream is left alone),
    created from `seed` and re-created from the seed of every seeded reset, so a seeded evaluation
    gets the same instructions every time.

    Args:
        perturbation: one of `PERTURBATIONS`.
        other_instructions: what ``other_task`` draws from, e.g. the other tasks of a benchmark suite.
        seed: seed of the generator until the first seeded reset.
    """

    def __init__(
        self,
        env: gym.Env,
        perturbation: str,
        other_instructions: Sequence[str] = (),
        seed: int | None = None,
    ):
        super().__init__(env)
        check_perturbation(perturbation)
        if perturbation == "other_task" and not other_instructions:
            raise ValueError("instruction_perturbation='other_task' needs other_instructions to draw from")
        self.perturbation = perturbation
        self.other_instructions = tuple(other_instructions)
        self._rng = self._generator(seed)
        self._instruction: str | None = None

    @staticmethod
    def _generator(seed: int | None) -> np.random.Generator:
        return np.random.default_rng(None if seed is None else [_WRAPPER_STREAM, seed])

    @property
    def task_description(self) -> str:
        """The perturbed instruction of the current episode."""
        if self._instruction is None:
            raise RuntimeError("call reset() before reading task_description")
        return self._instruction

    @property
    def task(self) -> str:
        """The perturbed instruction, hiding the wrapped env's ``task`` (present only if it has one)."""
        self.env.get_wrapper_attr("task")  # AttributeError when the wrapped env has none
        return self.task_description

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        observation, info = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self._rng = self._generator(seed)
        self._instruction = perturb_instruction(
            self.env.get_wrapper_attr("task_description"),
            self.perturbation,
            self._rng,
            self.other_instructions,
        )
        return observation, info
