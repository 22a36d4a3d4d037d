"""Pre/post-processing pipelines of the llava3d_fusion policy.

Input: rename -> batch dim -> check -> the geometry source's steps (recorded depth: to metres) -> the
geometry origin (with `geometry_origin="state"`: the raw state position, copied) -> task newline ->
tokenize (the backbone's tokenizer) -> device -> relative actions (when `use_relative_actions`) ->
normalize (state/action only). Output: unnormalize -> absolute actions (when
`use_relative_actions`) -> cpu, in pi0's order. Images stay float [0, 1]; the model resizes and
normalizes them for its vision tower once, on the device.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.lerobot_types import PolicyAction
from lerobot.processor import (
    AbsoluteActionsProcessorStep,
    NewLineTaskProcessorStep,
    NormalizerProcessorStep,
    ObservationProcessorStep,
    PolicyProcessorPipeline,
    ProcessorStepRegistry,
    RelativeActionsProcessorStep,
    TokenizerProcessorStep,
    TransitionKey,
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
)
from lerobot.utils.constants import OBS_STATE
from transformers import AutoTokenizer

from lerobot_llava3d_fusion.backbones.loading import load_tokenizer
from lerobot_llava3d_fusion.configuration_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.observation_keys import DEPTH_PREFIX, GEOMETRY_ORIGIN, GEOMETRY_PREFIXES

logger = logging.getLogger(__name__)


@ProcessorStepRegistry.register(name="llava3d_fusion_check_observation")
@dataclass
class Llava3DFusionObservationCheckStep(ObservationProcessorStep):
    """Fails clearly when an observation's features do not have the shapes the policy was built for.

    Runs before normalization, whose broadcasting error ("The size of tensor a (3) must match the size
    of tensor b (8)") would otherwise be the first symptom of a checkpoint used with another robot or
    env. Images and depth maps: only the channel count is checked (the model resizes images, and depth
    is back-projected at its own resolution with its own intrinsics); other features: the exact shape.
    Absent features are left to the policy, which names them (and may use config fallbacks).
    """

    features: dict[str, PolicyFeature] = field(default_factory=dict)

    def __post_init__(self):
        self.features = {
            key: ft
            if isinstance(ft, PolicyFeature)
            else PolicyFeature(FeatureType(ft["type"]), tuple(ft["shape"]))
            for key, ft in self.features.items()
        }

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        for key, feature in self.features.items():
            value = observation.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            got, expected = tuple(value.shape[1:]), tuple(feature.shape)  # batch dim excluded
            if feature.type is FeatureType.VISUAL or key.startswith(DEPTH_PREFIX):
                matches = len(got) == len(expected) and got[:1] == expected[:1]
            else:
                matches = got == expected
            if not matches:
                raise ValueError(
                    f"{key}: the policy was built for shape {expected}, but the observation has shape {got} "
                    "(batch dimension excluded). This checkpoint does not fit this robot/environment: use a "
                    "policy trained on matching features (or map observation keys with --rename_map)."
                )
        return observation

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        return features

    def get_config(self) -> dict[str, Any]:
        return {
            "features": {
                key: {"type": ft.type.value, "shape": list(ft.shape)} for key, ft in self.features.items()
            }
        }


@ProcessorStepRegistry.register(name="llava3d_fusion_geometry_origin")
@dataclass
class Llava3DFusionGeometryOriginStep(ObservationProcessorStep):
    """Copies the raw state position the 3D points are measured from (`geometry_origin="state"`) to
    `observation.geometry_origin` (B, 3), before the normalizer rescales `observation.state`."""

    state_indices: list[int] = field(default_factory=lambda: [0, 1, 2])

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        state = observation.get(OBS_STATE)
        if not isinstance(state, torch.Tensor):
            raise KeyError(
                f"geometry_origin='state' reads the origin of the 3D points from {OBS_STATE}, which this "
                f"observation lacks (keys: {sorted(observation)})."
            )
        if max(self.state_indices) >= state.shape[-1]:
            raise ValueError(
                f"geometry origin state indices {self.state_indices} do not fit {OBS_STATE} of shape "
                f"{tuple(state.shape)}."
            )
        return {**observation, GEOMETRY_ORIGIN: state[..., list(self.state_indices)].clone()}

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        return features

    def get_config(self) -> dict[str, Any]:
        return {"state_indices": list(self.state_indices)}


@ProcessorStepRegistry.register(name="llava3d_fusion_tokenizer")
@dataclass
class Llava3DFusionTokenizerStep(TokenizerProcessorStep):
    """Tokenizes the task with the tokenizer of `vlm_model_name` (including the offline "tiny" one).

    A saved pipeline carries the tokenizer's files in the step's state file (`state_dict`), so a
    checkpoint's preprocessor loads without the backbone's directory or Hub repo; `vlm_model_name` is
    then only a record of where it came from. Rejects a missing task and empty task strings (the policy
    is language-conditioned), and warns once when a task is cut to `max_length` tokens.
    """

    vlm_model_name: str = ""
    # True in saved pipelines: the tokenizer comes from the state file, not from `vlm_model_name`.
    tokenizer_in_state: bool = False
    _warned_truncation: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if self.tokenizer is None and not self.tokenizer_in_state:
            if not self.vlm_model_name:
                raise ValueError("Llava3DFusionTokenizerStep needs vlm_model_name.")
            self.tokenizer = load_tokenizer(self.vlm_model_name)
        if self.tokenizer is not None:
            super().__post_init__()

    def get_task(self, transition):
        if self.input_tokenizer is None:
            raise RuntimeError(
                f"the tokenizer of {self.vlm_model_name!r} was not loaded: a saved pipeline brings it in "
                "its state file; load the pipeline with PolicyProcessorPipeline.from_pretrained."
            )
        task = (transition.get(TransitionKey.COMPLEMENTARY_DATA) or {}).get(self.task_key)
        if task is None:
            raise KeyError(
                f"{self.task_key!r} missing from the batch: llava3d_fusion is language-conditioned; give the "
                f"instruction as batch[{self.task_key!r}] (a string, or a list of one string per sample)."
            )
        tasks = super().get_task(transition)
        if tasks is None:
            raise TypeError(
                f"{self.task_key!r} must be a string or a list of strings (one per sample), got "
                f"{type(task).__name__}: {task!r:.80}"
            )
        if any(not task.strip() for task in tasks):
            raise ValueError(
                f"empty task string in {tasks!r}: llava3d_fusion needs an instruction per sample."
            )
        return tasks

    def _tokenize_text(self, text: str | list[str]) -> dict[str, torch.Tensor]:
        tokenized = super()._tokenize_text(text)
        cut = self.truncation and tokenized["input_ids"].shape[-1] >= self.max_length
        if cut and not self._warned_truncation:
            texts = [text] if isinstance(text, str) else text
            longest = max(len(ids) for ids in self.input_tokenizer(texts)["input_ids"])  # untruncated
            if longest > self.max_length:
                logger.warning(
                    "a task of %d tokens was cut to tokenizer_max_length=%d tokens (warned once): raise "
                    "--policy.tokenizer_max_length to keep whole instructions.",
                    longest,
                    self.max_length,
                )
                self._warned_truncation = True
        return tokenized

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vlm_model_name": self.vlm_model_name, "tokenizer_in_state": True}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tokenizer's files (as `save_pretrained` writes them), one uint8 tensor per file."""
        with tempfile.TemporaryDirectory() as directory:
            self.input_tokenizer.save_pretrained(directory)
            return {
                path.name: torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
                for path in sorted(Path(directory).iterdir())
                if path.is_file()
            }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            for filename, data in state.items():
                (Path(directory) / filename).write_bytes(data.numpy().tobytes())
            self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.input_tokenizer = self.tokenizer


def normalized_observation_keys(config: Llava3DFusionConfig) -> set[str]:
    """The observation features the normalizer may touch: neither images nor depth and camera matrices.

    Saved in the normalizer's config (`normalize_observation_keys`), so it survives what
    `lerobot-train` does when it fine-tunes (`--policy.path`) or resumes a checkpoint: it overrides the
    normalizer's features with every input feature and the policy's per-type `normalization_mapping`,
    under which camera matrices (STATE features) would otherwise get MEAN_STD.
    """
    return {
        key
        for key, feature in config.input_features.items()
        if feature.type is not FeatureType.VISUAL and not key.startswith(GEOMETRY_PREFIXES)
    }


def make_llava3d_fusion_pre_post_processors(
    config: Llava3DFusionConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    steps = make_default_policy_processor_steps(config, dataset_stats)
    # Saved under their registry names, so lerobot-train's relative-action overrides find them.
    relative_step = RelativeActionsProcessorStep(
        enabled=config.use_relative_actions,
        exclude_joints=list(config.relative_exclude_joints),
        action_names=config.action_feature_names,
    )
    input_steps = [
        steps.rename_observations,
        steps.add_batch_dim,
        Llava3DFusionObservationCheckStep(features=dict(config.input_features)),
        # What the geometry source reads from the batch (recorded depth: to observation.depth.<cam> in metres).
        *config.geometry_source.preprocessor_steps(config.geometry_camera_keys, config.input_features),
        *(
            [Llava3DFusionGeometryOriginStep(state_indices=list(config.geometry_origin_state_indices))]
            if config.geometry_origin == "state"
            else []
        ),
        NewLineTaskProcessorStep(),
        Llava3DFusionTokenizerStep(
            vlm_model_name=config.vlm_model_name,
            max_length=config.tokenizer_max_length,
            padding="longest",
            padding_side="right",
        ),
        steps.to_device,
        relative_step,
        NormalizerProcessorStep(
            features={**config.input_features, **config.output_features},
            norm_map=config.normalization_mapping,
            stats=dataset_stats,
            normalize_observation_keys=normalized_observation_keys(config),
        ),
    ]
    output_steps = [
        steps.unnormalize,
        AbsoluteActionsProcessorStep(enabled=config.use_relative_actions, relative_step=relative_step),
        steps.to_cpu,
    ]
    return make_policy_processor_pipelines(input_steps=input_steps, output_steps=output_steps)
