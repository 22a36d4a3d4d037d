"""Llava3DFusionPolicy: the LeRobot contract around `Llava3DFusionModel`.

It turns LeRobot batches (after the policy preprocessor) into model inputs (`model/inputs.py`, which
checks them) and model outputs back into LeRobot actions; the network itself lives in `model/`.

Annotations here are evaluated at runtime (no `from __future__ import annotations`): LeRobot's
policy checks read `__init__`'s `config` annotation as a class.
"""

import copy
import logging
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from lerobot.configs import DEPTH_METER_UNIT, PreTrainedConfig
from lerobot.configs.train import TrainPipelineConfig
from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
from lerobot.policies.common.vla_utils import pad_vector
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.policies.rtc.modeling_rtc import RTCProcessor
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_TOKENS
from torch import Tensor

from lerobot_llava3d_fusion.backbones.files import (
    BackboneSource,
    checkpoint_backbone_source,
    save_backbone_files,
)
from lerobot_llava3d_fusion.checkpoint import (
    fetch_versions_file,
    load_weights,
    read_saved_tensors,
    save_library_versions,
)
from lerobot_llava3d_fusion.configuration_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.model.augmentation import random_crop_inputs, sensor_depth_noise_inputs
from lerobot_llava3d_fusion.model.inputs import BatchToModelInputs, check_finite
from lerobot_llava3d_fusion.model.network import TORCH_DTYPES, Llava3DFusionModel, ModelInputs
from lerobot_llava3d_fusion.model_card import build_model_card

logger = logging.getLogger(__name__)

ACTION_IS_PAD = f"{ACTION}_is_pad"  # LeRobot datasets: True where the chunk runs past the episode


class Llava3DFusionPolicy(PreTrainedPolicy):
    """3D-aware LLaVA VLA with a deep-fusion flow-matching action expert."""

    config_class = Llava3DFusionConfig
    name = "llava3d_fusion"

    def __init__(self, config: Llava3DFusionConfig, backbone_source: BackboneSource | None = None, **kwargs):
        """`backbone_source`: where the backbone's architecture files are (default: the config's
        `vlm_model_name` / `vision_tower_name`; `from_pretrained` passes the checkpoint's own copy)."""
        super().__init__(config)
        config.validate_features()
        self.config = config
        self.model = Llava3DFusionModel(config, backbone_source)
        self._batch_to_inputs = BatchToModelInputs(config, self.model.image_size)
        self._warned_batch_size_change = False
        self.model.fusion.gradient_checkpointing = config.gradient_checkpointing
        self._apply_freeze_flags()
        self._trains = False  # set by train(): keep float32 master weights from then on
        self._masters_file: Path | None = None  # a loaded checkpoint's, until the policy trains
        self._set_storage_dtypes()
        self.init_rtc_processor()
        self.reset()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path,
        *,
        config: PreTrainedConfig | None = None,
        strict: bool = True,
        **kwargs,
    ):
        """LeRobot's loading, strict by default (`checkpoint.py`): a key of the checkpoint or the policy
        left unmatched after the known layout migrations is an error; `strict=False` logs it instead.
        A `config` passed in is copied, never changed."""
        # The checkpoint holds every weight: do not fetch the backbone's pretrained weights again, and
        # build the architecture from the backbone files the checkpoint carries.
        if config is None:
            config = PreTrainedConfig.from_pretrained(pretrained_name_or_path, **kwargs)
        else:
            config = copy.deepcopy(config)
        config.load_vlm_weights = False
        source = checkpoint_backbone_source(pretrained_name_or_path, config, **kwargs)
        fetch_versions_file(pretrained_name_or_path, **kwargs)
        return super().from_pretrained(
            pretrained_name_or_path, config=config, strict=strict, backbone_source=source, **kwargs
        )

    @classmethod
    def _load_as_safetensor(cls, model, model_file: str, map_location: str, strict: bool):
        # Read on the CPU, where the policy is built; LeRobot moves it to `config.device` afterwards.
        load_weights(model, model_file, "cpu", strict)
        model._store_to_act(Path(model_file))
        return model

    def _store_to_act(self, checkpoint_file: Path) -> None:
        """A loaded policy acts until it trains: its weights go to `config.dtype` now, before LeRobot
        moves it to its device, so float32 master copies never occupy the accelerator (a 7B model:
        14 GB instead of 28). `train()` reads the trained ones back from `checkpoint_file`."""
        if TORCH_DTYPES[self.config.dtype] == torch.float32:
            return
        self._set_storage_dtypes(master_weights=False)
        self._masters_file = checkpoint_file

    def _saved_masters(self) -> dict[str, Tensor]:
        """The float32 values the checkpoint saved for the weights that train, where the policy still
        holds them (rounded to `config.dtype`); a weight changed since loading, or one the checkpoint
        does not hold (an adapter's), is left out with a warning for the changed ones."""
        if self._masters_file is None:
            return {}
        trainable = {name: param for name, param in self.named_parameters() if param.requires_grad}
        saved = read_saved_tensors(self, self._masters_file, trainable)
        unchanged, changed = {}, []
        for name, tensor in saved.items():
            stored = trainable[name].detach()
            if torch.equal(tensor.to(stored.device, stored.dtype), stored):
                unchanged[name] = tensor.to(torch.float32)
            else:
                changed.append(name)
        if changed:
            logger.warning(
                "%d trained weight(s) changed after loading %s (%s, ...): they keep their %s values "
                "instead of the file's float32 ones.",
                len(changed),
                self._masters_file,
                changed[0],
                self.config.dtype,
            )
        return unchanged

    def _save_pretrained(self, save_directory: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        if state_dict is None and self._masters_file is not None:
            # Loaded and never trained: save the checkpoint's float32 weights, not their rounded copies.
            state_dict = {**self.state_dict(), **self._saved_masters()}
        super()._save_pretrained(save_directory, state_dict)
        save_backbone_files(self.model.backbone_source, self.model.tokenizer, save_directory)
        save_library_versions(save_directory)

    def generate_model_card(
        self,
        dataset_repo_id: str,
        model_type: str,
        license: str | None,
        tags: list[str] | None,
        cfg: TrainPipelineConfig | None = None,
        dataset_meta: LeRobotDatasetMetadata | None = None,
    ) -> ModelCard:
        """This policy's own card on `push_model_to_hub` (`model_card.py`): the install line, the backbone
        and its licence, the inputs the checkpoint needs; `license` is the config's, read there."""
        return build_model_card(self.config, dataset_repo_id, tags, cfg=cfg, dataset_meta=dataset_meta)

    def _apply_freeze_flags(self) -> None:
        if self.config.freeze_vision_encoder or self.config.train_expert_only:
            self.model.image_encoder.vision_tower.requires_grad_(False)
        if self.config.train_expert_only:
            # Everything of the VLM stream is frozen; the separate expert stack and the
            # flow-matching projections train.
            for module in (
                self.model.image_encoder,
                self.model.embed_tokens,
                self.model.fusion.vlm_layers,
                self.model.fusion.vlm_norm,
            ):
                module.requires_grad_(False)
            # A pretrained geometry encoder (LLaVA-3D's position MLP) is part of that VLM: frozen with it,
            # the VLM stream needs no backward pass. A new one trains, or its gated term would stay at its
            # initial value (zero by default); with geometry_target="prefix" its gradient then crosses the
            # frozen VLM stream (demo-sized model: 2.8x the activations kept for backward, 1.23x the step
            # time); geometry_target="expert" keeps it out of that stream.
            if self.model.geometry_encoder is not None and self.model.geometry_encoder_is_pretrained:
                self.model.geometry_encoder.requires_grad_(False)

    def _set_storage_dtypes(self, master_weights: bool = True) -> None:
        """Mixed precision as LeRobot users expect it: every parameter that trains keeps a float32
        master copy, so the optimizer's small updates are not rounded away (bf16 has an 8-bit
        mantissa: a step of 2.5e-6 on a weight of 1.0 would vanish); frozen parameters are stored in
        `config.dtype` to save memory. Compute runs in `config.dtype` under autocast (the model's
        `compute_precision`, and Accelerate's in `lerobot-train`).

        `master_weights=False` (inference): every parameter in `config.dtype`, as a bf16 model is
        served; `predict_action_chunk` switches to it unless the policy has trained (`train()`)."""
        frozen_dtype = TORCH_DTYPES[self.config.dtype]
        # Never inference tensors as weights (lerobot-eval acts under inference_mode): autograd refuses
        # them in any later computation with gradients.
        with torch.inference_mode(False), torch.no_grad():
            for param in self.parameters():
                keep_float32 = master_weights and param.requires_grad
                param.data = param.data.to(torch.float32 if keep_float32 else frozen_dtype)
        self._master_weights = master_weights

    def train(self, mode: bool = True) -> "Llava3DFusionPolicy":
        """A policy that trains keeps float32 master weights, in its evaluation passes too (so
        lerobot-train's periodic evaluation never rounds them); one that only acts stores them in
        `config.dtype`: when loaded (`_store_to_act`), or at its first chunk when built in Python."""
        if mode:
            self._keep_master_weights()
        return super().train(mode)

    def _keep_master_weights(self) -> None:
        """From now on the policy trains: float32 master weights for what trains, a loaded checkpoint's
        read back from its file (see `_store_to_act`)."""
        self._trains = True
        if self._master_weights:
            return
        masters = self._saved_masters()
        self._set_storage_dtypes()
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name in masters:
                    param.copy_(masters[name])
        self._masters_file = None

    def get_optim_params(self) -> list[torch.nn.Parameter]:
        """The parameters that train, as float32 masters: lerobot-train builds its optimizer (and loads a
        resumed run's optimizer state, cast to the parameters' dtype) before it calls `train()`."""
        self._keep_master_weights()
        return [p for p in self.parameters() if p.requires_grad]

    # --------------------------------------------------------------- LeRobot VLA features

    def supports_rtc(self) -> bool:
        return True

    def init_rtc_processor(self) -> None:
        """(Re)build the RTC processor from `config.rtc_config` (lerobot-rollout sets it, then calls this)."""
        self.rtc_processor = (
            RTCProcessor(self.config.rtc_config) if self.config.rtc_config is not None else None
        )

    def _rtc_enabled(self) -> bool:
        return self.config.rtc_config is not None and self.config.rtc_config.enabled

    def gradient_checkpointing_enable(self) -> None:
        self.config.gradient_checkpointing = True
        self.model.fusion.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.config.gradient_checkpointing = False
        self.model.fusion.gradient_checkpointing = False

    @property
    def _no_split_modules(self) -> list[str]:
        """FSDP units (Accelerate's transformer-based auto wrap reads this): the decoder layers' MLP
        blocks of both streams, the modules of a fused layer that run through their own forward (the
        fused layer calls its attention projections one by one). The rest shards with the root unit."""
        fusion = self.model.fusion
        return sorted({type(layer.mlp).__name__ for layer in (*fusion.vlm_layers, *fusion.expert_layers)})

    def _get_default_peft_targets(self) -> dict:
        """LoRA (or any PEFT method) on the attention and MLP projections of both streams' fused
        layers; the flow-matching head and the geometry encoder (small, robot-specific) train in full."""
        target_modules = (
            r".*\.fusion\.(vlm_layers|separate_expert_layers)\.\d+\."
            r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
        )
        full = [
            name
            for name in ("action_expert", "geometry_encoder", "expert_patch_proj")
            if getattr(self.model, name, None) is not None
        ]
        return {"target_modules": target_modules, "modules_to_save": full}

    def wrap_with_peft(self, peft_config=None, peft_cli_overrides: dict | None = None) -> PreTrainedPolicy:
        """LeRobot's PEFT wrapping; afterwards the now-frozen base weights are stored in `config.dtype`
        and the adapters (and fully trained heads) keep float32 master weights, as everywhere else."""
        wrapped = super().wrap_with_peft(peft_config=peft_config, peft_cli_overrides=peft_cli_overrides)
        self._set_storage_dtypes()
        return wrapped

    def _validate_peft_config(self, peft_config) -> None:
        if not self.config.pretrained_path:
            # LeRobot saves an adapter on top of `pretrained_path` and reloads it from there: without a
            # policy checkpoint underneath, lerobot-eval could not load the result.
            raise ValueError(
                "PEFT adapts a trained llava3d_fusion checkpoint: pass --policy.path=<checkpoint>. To "
                "LoRA-tune a pretrained backbone, first train the new parts with the VLM frozen "
                "(--policy.type=llava3d_fusion --policy.vlm_model_name=<backbone> "
                "--policy.train_expert_only=true), then run --policy.path=<that checkpoint> "
                "--peft.method_type=LORA."
            )

    def reset(self) -> None:
        """Empty the action queue (call at every environment reset)."""
        self._action_queue: deque[Tensor] = deque(maxlen=self.config.n_action_steps)
        self._unexecuted_actions: Tensor | None = None  # (B, T, action_dim) planned, not executed

    # ------------------------------------------------------------------------ batch -> inputs

    def _prepare_inputs(
        self,
        batch: dict[str, Tensor],
        depth_unit: str = DEPTH_METER_UNIT,
        per_sample_keys: tuple[str, ...] = (),
    ) -> ModelInputs:
        """The model's inputs from a preprocessed batch, checked (`model/inputs.py`)."""
        return self._batch_to_inputs(batch, depth_unit, per_sample_keys)

    @property
    def device_of_model(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def action_dim(self) -> int:
        return self.config.action_feature.shape[-1]

    # ------------------------------------------------------------------------------- training

    def forward(
        self,
        batch: dict[str, Tensor],
        noise: Tensor | None = None,
        time: Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[Tensor, dict[str, float]]:
        """Flow-matching loss, averaged over real (non-padded) action steps and dims."""
        inputs = self._prepare_inputs(
            batch, self.config.dataset_depth_unit, per_sample_keys=(ACTION, ACTION_IS_PAD)
        )
        if self.training and self.config.augment_depth_noise:
            inputs = sensor_depth_noise_inputs(inputs)
        if self.training and self.config.augment_crop_scale < 1.0:
            inputs = random_crop_inputs(inputs, self.config.augment_crop_scale)
        actions = batch[ACTION]
        expected = (self.config.chunk_size, self.action_dim)
        if actions.ndim != 3 or tuple(actions.shape[1:]) != expected:
            raise ValueError(
                f"{ACTION}: expected shape (B, {expected[0]}, {expected[1]}), got {tuple(actions.shape)}"
            )
        check_finite(ACTION, actions)
        padded_actions = pad_vector(actions.float(), self.config.max_action_dim)
        if noise is not None and noise.shape != padded_actions.shape:
            raise ValueError(f"noise: expected shape {tuple(padded_actions.shape)}, got {tuple(noise.shape)}")
        if time is not None and tuple(time.shape) != (actions.shape[0],):
            raise ValueError(f"time: expected shape ({actions.shape[0]},), got {tuple(time.shape)}")

        losses = self.model(inputs, padded_actions, noise=noise, time=time)
        losses = losses[:, :, : self.action_dim]  # drop padded action dims
        step_valid = (
            ~batch[ACTION_IS_PAD] if ACTION_IS_PAD in batch else torch.ones_like(losses[..., 0]).bool()
        )
        weights = step_valid[..., None].expand_as(losses).float()
        per_sample = (losses * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp(min=1.0)
        if reduction == "none":
            return per_sample, {"loss": per_sample.mean().item()}
        loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
        return loss, {"loss": loss.item()}

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict_action_chunk(
        self,
        batch: dict[str, Tensor],
        noise: Tensor | None = None,
        inference_delay: int | None = None,
        prev_chunk_left_over: Tensor | None = None,
        execution_horizon: int | None = None,
    ) -> Tensor:
        """(B, chunk_size, action_dim) actions; `noise` (B, chunk_size, max_action_dim) fixes the sample.

        Real-time chunking (with `rtc_config` enabled): `prev_chunk_left_over` ((B,) T_prev, action_dim),
        the previous chunk's actions not yet executed, in the policy's normalized action space;
        `inference_delay` (actions that will run while this chunk is computed) and `execution_horizon`
        (default: rtc_config's) shape the guidance weights, as in LeRobot's pi0.
        """
        self.eval()
        if not self._trains and self._master_weights:
            self._set_storage_dtypes(master_weights=False)  # weights and KV cache in config.dtype
        inputs = self._prepare_inputs(batch)
        shape = (inputs.state.shape[0], self.config.chunk_size, self.config.max_action_dim)
        if noise is None:
            noise = torch.randn(shape, device=inputs.state.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
        rtc_kwargs = self._rtc_kwargs(inference_delay, prev_chunk_left_over, execution_horizon)
        check_finite("noise", noise)
        actions = self.model.sample_actions(inputs, noise.float(), **rtc_kwargs)
        if not torch.isfinite(actions).all():
            # The inputs and the noise were checked finite: the network produced the NaN or inf.
            raise FloatingPointError(
                "the sampled actions hold NaN or inf values from finite inputs: the policy's weights are "
                "damaged or come from a diverged training run (try an earlier checkpoint), or the compute "
                f"dtype overflowed (dtype={self.config.dtype!r}; try dtype='float32')."
            )
        return actions[:, :, : self.action_dim]

    def _rtc_kwargs(
        self, inference_delay: int | None, prev_chunk_left_over: Tensor | None, execution_horizon: int | None
    ) -> dict:
        if self.rtc_processor is None:
            if prev_chunk_left_over is not None:
                raise ValueError(
                    "prev_chunk_left_over was given but real-time chunking is off: set the policy's "
                    "rtc_config (lerobot-rollout --inference.type=rtc does)."
                )
            return {}
        if prev_chunk_left_over is not None and self._rtc_enabled():
            if prev_chunk_left_over.ndim not in (2, 3) or prev_chunk_left_over.shape[-1] != self.action_dim:
                raise ValueError(
                    f"prev_chunk_left_over: expected shape ([B,] T, {self.action_dim}), "
                    f"got {tuple(prev_chunk_left_over.shape)}"
                )
            if inference_delay is None or inference_delay < 0:
                raise ValueError(f"inference_delay must be an int >= 0 with RTC, got {inference_delay!r}.")
            prev_chunk_left_over = prev_chunk_left_over.float().to(self.device_of_model)
        return {
            "rtc_processor": self.rtc_processor,
            "rtc_enabled": self._rtc_enabled(),
            "inference_delay": inference_delay,
            "prev_chunk_left_over": prev_chunk_left_over,
            "execution_horizon": execution_horizon,
        }

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """One action (B, action_dim); a new chunk is predicted when the queue of n_action_steps runs out.

        With `rtc_config` enabled (e.g. `lerobot-eval --policy.rtc_config.enabled=true`) each new chunk
        is guided towards the previous chunk's actions that were predicted but not executed (its last
        chunk_size - n_action_steps), with no inference delay: re-plans continue the plan under way
        instead of switching between equally likely ones (e.g. two blocks) from chunk to chunk.

        A call whose batch size differs from the queued chunk's (a new set of environments without
        `reset()`) empties the queue and starts a new chunk, with a warning the first time: queued
        actions belong to other samples and are never served.
        """
        batch_size = batch[OBS_LANGUAGE_TOKENS].shape[0] if OBS_LANGUAGE_TOKENS in batch else None
        if self._action_queue and self._action_queue[0].shape[0] != batch_size:
            if not self._warned_batch_size_change:
                logger.warning(
                    "select_action: batch size %s, but the queued actions are for %d samples: starting a new "
                    "chunk (call reset() when the environments change).",
                    batch_size,
                    self._action_queue[0].shape[0],
                )
                self._warned_batch_size_change = True
            self.reset()
        if self._rtc_enabled() and self.config.use_relative_actions:
            raise ValueError(
                "select_action with rtc_config enabled guides each chunk by the previous one's actions, "
                "which use_relative_actions expresses relative to an older state: disable one of them."
            )
        if not self._action_queue:
            leftover = self._unexecuted_actions if self._rtc_enabled() else None
            # RTC's guidance differentiates through the sampler's state, which inference mode forbids
            # (lerobot-eval calls select_action under torch.inference_mode()).
            with torch.inference_mode(False) if leftover is not None else nullcontext():
                chunk = self.predict_action_chunk(
                    batch,
                    noise=noise,
                    inference_delay=None if leftover is None else 0,
                    prev_chunk_left_over=None if leftover is None else leftover.clone(),
                )
            n_steps = self.config.n_action_steps
            self._unexecuted_actions = chunk[:, n_steps:] if n_steps < chunk.shape[1] else None
            self._action_queue.extend(chunk[:, :n_steps].transpose(0, 1))  # queue of (B, action_dim)
        return self._action_queue.popleft()
