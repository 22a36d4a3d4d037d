"""Llava3DFusionPolicy: the LeRobot contract around `Llava3DFusionModel`.

It checks and turns LeRobot batches (after the policy preprocessor) into model inputs, and turns
model outputs back into LeRobot actions; the network itself lives in `model.py`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import torch
from lerobot.configs import DEPTH_METER_UNIT, PreTrainedConfig
from lerobot.policies.common.vla_utils import pad_vector
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.policies.rtc.modeling_rtc import RTCProcessor
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE
from torch import Tensor

from lerobot_llava3d_fusion.model.augmentation import crop_and_resize, crop_intrinsics, random_crop_offsets
from lerobot_llava3d_fusion.geometry.depth_noise import sensor_depth_noise
from lerobot_llava3d_fusion.backbones.files import BackboneSource, checkpoint_backbone_source, save_backbone_files
from lerobot_llava3d_fusion.configuration_llava3d_fusion import EMPTY_CAMERA_PREFIX, Llava3DFusionConfig
from lerobot_llava3d_fusion.model.network import TORCH_DTYPES, CameraGeometry, Llava3DFusionModel, ModelInputs
from lerobot_llava3d_fusion.observation_keys import GEOMETRY_ORIGIN, camera_name, depth_key, extrinsics_key, intrinsics_key


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
        self.model.fusion.gradient_checkpointing = config.gradient_checkpointing
        self._apply_freeze_flags()
        self._set_storage_dtypes()
        self.init_rtc_processor()
        self.reset()

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, *, config: PreTrainedConfig | None = None, **kwargs):
        # The checkpoint holds every weight: do not fetch the backbone's pretrained weights again, and
        # build the architecture from the backbone files the checkpoint carries.
        if config is None:
            config = PreTrainedConfig.from_pretrained(pretrained_name_or_path, **kwargs)
        config.load_vlm_weights = False
        source = checkpoint_backbone_source(pretrained_name_or_path, config, **kwargs)
        return super().from_pretrained(
            pretrained_name_or_path, config=config, backbone_source=source, **kwargs
        )

    def _save_pretrained(self, save_directory: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        super()._save_pretrained(save_directory, state_dict)
        save_backbone_files(self.model.backbone_source, self.model.tokenizer, save_directory)

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

    def _set_storage_dtypes(self) -> None:
        """Mixed precision as LeRobot users expect it: every parameter that trains keeps a float32
        master copy, so the optimizer's small updates are not rounded away (bf16 has an 8-bit
        mantissa: a step of 2.5e-6 on a weight of 1.0 would vanish); frozen parameters are stored in
        `config.dtype` to save memory. Compute runs in `config.dtype` under autocast (the model's
        `compute_precision`, and Accelerate's in `lerobot-train`)."""
        frozen_dtype = TORCH_DTYPES[self.config.dtype]
        for param in self.parameters():
            param.data = param.data.to(torch.float32 if param.requires_grad else frozen_dtype)

    def get_optim_params(self) -> list[torch.nn.Parameter]:
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

    def _prepare_inputs(self, batch: dict[str, Tensor], depth_unit: str = DEPTH_METER_UNIT) -> ModelInputs:
        """The model's inputs from a preprocessed batch; `depth_unit`: the unit of its recorded depth maps
        (training batches: the config's `dataset_depth_unit`; observations at inference: metres)."""
        cfg = self.config
        for key in (OBS_LANGUAGE_TOKENS, OBS_LANGUAGE_ATTENTION_MASK):
            if key not in batch:
                raise KeyError(
                    f"{key!r} missing from the batch: run the policy's preprocessor (it tokenizes the task)."
                )
        lang_tokens, lang_mask = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK].bool()
        if not lang_mask.any(dim=1).all():
            raise ValueError(
                "a sample has an empty task: llava3d_fusion needs a task instruction per sample."
            )

        batch_size = lang_tokens.shape[0]
        images, camera_present = [], []
        for key in cfg.camera_keys:
            if key not in batch and key.startswith(EMPTY_CAMERA_PREFIX):
                # pi0's empty camera: a blank image whose tokens are masked out.
                size = self.model.image_size
                images.append(torch.zeros(batch_size, 3, size, size, device=lang_tokens.device))
                camera_present.append(torch.zeros(batch_size, dtype=torch.bool, device=lang_tokens.device))
                continue
            if key not in batch:
                present = sorted(k for k in batch if k.startswith("observation."))
                raise KeyError(f"camera {key!r} missing from the batch; observation keys present: {present}")
            image = batch[key]
            if image.ndim != 4 or image.shape[1] != 3:
                raise ValueError(f"{key}: expected images of shape (B, 3, H, W), got {tuple(image.shape)}")
            _check_finite(key, image)
            images.append(image)
            camera_present.append(None)

        point_cameras = set(cfg.geometry_camera_keys)
        origin = self._geometry_origin(batch, batch_size) if point_cameras else None  # shared by all cameras
        camera_geometry = [
            self._prepare_camera_geometry(batch, key, batch_size, origin, depth_unit)
            if key in point_cameras
            else None
            for key in cfg.camera_keys
        ]
        state = self._prepare_state(batch, batch_size)
        return ModelInputs(images, camera_geometry, lang_tokens, lang_mask, state, camera_present)

    def _prepare_camera_geometry(
        self,
        batch: dict[str, Tensor],
        camera_key: str,
        batch_size: int,
        origin: Tensor | None,
        depth_unit: str,
    ) -> CameraGeometry:
        """The depth the geometry source reads from the batch (none when it estimates depth) and the
        camera matrices of one camera, from the batch or the config; `origin` (B, 3) or None."""
        cfg = self.config
        name = camera_name(camera_key)
        device = batch[OBS_LANGUAGE_TOKENS].device
        depth = cfg.geometry_source.batch_depth(
            batch, camera_key, batch_size, cfg.geometry_max_depth, depth_unit
        )
        intrinsics = self._camera_matrix(
            batch, intrinsics_key(camera_key), cfg.camera_intrinsics.get(name), 3, device
        )
        if intrinsics is None:
            raise KeyError(
                f"no intrinsics for camera {name!r}: put {intrinsics_key(camera_key)!r} in the observation or "
                f"set camera_intrinsics[{name!r}] in the policy config."
            )
        _check_pinhole(intrinsics_key(camera_key), intrinsics)
        if depth is not None:
            self._check_depth_grid(
                camera_key, depth, intrinsics, from_config=intrinsics_key(camera_key) not in batch
            )
        extrinsics = self._camera_matrix(
            batch, extrinsics_key(camera_key), cfg.camera_extrinsics.get(name), 4, device
        )
        if extrinsics is not None:
            _check_rigid_transform(extrinsics_key(camera_key), extrinsics)
        return CameraGeometry(
            intrinsics=intrinsics,
            depth=depth,
            extrinsics=extrinsics,
            origin=origin,
        )

    def _geometry_origin(self, batch: dict[str, Tensor], batch_size: int) -> Tensor | None:
        """(B, 3) raw state position the 3D points are measured from (`geometry_origin="state"`), else None."""
        if self.config.geometry_origin != "state":
            return None
        if GEOMETRY_ORIGIN not in batch:
            raise KeyError(
                f"geometry_origin='state' needs {GEOMETRY_ORIGIN!r}, the raw state position the policy's "
                "preprocessor copies before normalizing the state: run the batch through that preprocessor "
                "(make_pre_post_processors / the checkpoint's policy_preprocessor)."
            )
        origin = batch[GEOMETRY_ORIGIN]
        if tuple(origin.shape) != (batch_size, 3):
            raise ValueError(
                f"{GEOMETRY_ORIGIN}: expected shape ({batch_size}, 3), got {tuple(origin.shape)}"
            )
        _check_finite(GEOMETRY_ORIGIN, origin)
        return origin

    def _check_depth_grid(
        self, camera_key: str, depth: Tensor, intrinsics: Tensor, from_config: bool
    ) -> None:
        """The intrinsics must describe the depth image's pixel grid, or back-projection is silently wrong."""
        height, width = depth.shape[-2:]
        key = depth_key(camera_key)
        recorded = self.config.input_features[key].shape[-2:] if key in self.config.input_features else None
        if from_config and recorded is not None and tuple(recorded) != (height, width):
            raise ValueError(
                f"{key} is {height}x{width}, but camera_intrinsics[{camera_name(camera_key)!r}] of the config "
                f"describe the {recorded[0]}x{recorded[1]} depth the policy was trained on: resize the "
                "depth to that resolution, or give per-frame intrinsics for this one in "
                f"{intrinsics_key(camera_key)!r}."
            )
        principal_x, principal_y = intrinsics[..., 0, 2], intrinsics[..., 1, 2]
        if ((principal_x < 0) | (principal_x > width) | (principal_y < 0) | (principal_y > height)).any():
            raise ValueError(
                f"{key} is {height}x{width}, but {intrinsics_key(camera_key)} puts the principal point at "
                f"(cx, cy) = ({principal_x.max().item():g}, {principal_y.max().item():g}), outside it: the "
                f"intrinsics are for an image of about {2 * principal_y.max().item():.0f}x"
                f"{2 * principal_x.max().item():.0f}. They must describe the depth image's own pixel grid "
                "(scale fx, fy, cx, cy with the depth's resolution)."
            )

    @staticmethod
    def _camera_matrix(batch, key: str, fallback, size: int, device) -> Tensor | None:
        matrix = batch[key] if key in batch else (torch.tensor(fallback, device=device) if fallback else None)
        if matrix is None:
            return None
        matrix = matrix.float()
        if matrix.shape[-2:] != (size, size):
            raise ValueError(
                f"{key}: expected a {size}x{size} matrix per sample, got shape {tuple(matrix.shape)}"
            )
        _check_finite(key, matrix)
        return matrix

    def _prepare_state(self, batch: dict[str, Tensor], batch_size: int) -> Tensor:
        cfg = self.config
        state_feature = cfg.robot_state_feature
        if state_feature is None:
            return torch.zeros(batch_size, cfg.max_state_dim, device=self.device_of_model)
        if OBS_STATE not in batch:
            raise KeyError(f"{OBS_STATE!r} missing from the batch (the policy was configured with a state).")
        state = batch[OBS_STATE]
        expected = state_feature.shape[-1]
        if state.ndim != 2 or state.shape[-1] != expected:
            raise ValueError(f"{OBS_STATE}: expected shape (B, {expected}), got {tuple(state.shape)}")
        _check_finite(OBS_STATE, state)
        return pad_vector(state.float(), cfg.max_state_dim)

    def _random_crop(self, inputs: ModelInputs) -> ModelInputs:
        """Training augmentation: one random crop per camera and sample, applied alike to the image, its
        depth and its intrinsics, so the 3D positions stay consistent with the pixels (`augmentation.py`)."""
        scale = self.config.augment_crop_scale
        images, camera_geometry = [], []
        for image, camera in zip(inputs.images, inputs.camera_geometry, strict=True):
            batch_size = image.shape[0]
            offsets = random_crop_offsets(batch_size, scale, image.device)
            images.append(crop_and_resize(image, scale, offsets, mode="bilinear"))
            if camera is not None:
                # The intrinsics describe the depth's grid, or the image's when depth is estimated.
                grid = image if camera.depth is None else camera.depth
                intrinsics = crop_intrinsics(
                    camera.intrinsics.expand(batch_size, 3, 3), scale, offsets, *grid.shape[-2:]
                )
                depth = (
                    None if camera.depth is None else crop_and_resize(camera.depth, scale, offsets, "nearest")
                )
                camera = CameraGeometry(intrinsics=intrinsics, depth=depth, extrinsics=camera.extrinsics)
            camera_geometry.append(camera)
        return inputs._replace(images=images, camera_geometry=camera_geometry)

    def _sensor_depth_noise(self, inputs: ModelInputs) -> ModelInputs:
        """Training augmentation: every recorded depth map made sensor-like (`geometry/depth_noise.py`),
        at its recorded resolution and before any crop, as a real camera would deliver it."""
        camera_geometry = [
            camera if camera is None or camera.depth is None
            else dataclasses.replace(camera, depth=sensor_depth_noise(camera.depth))
            for camera in inputs.camera_geometry
        ]
        return inputs._replace(camera_geometry=camera_geometry)

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
        inputs = self._prepare_inputs(batch, depth_unit=self.config.dataset_depth_unit)
        if self.training and self.config.augment_depth_noise:
            inputs = self._sensor_depth_noise(inputs)
        if self.training and self.config.augment_crop_scale < 1.0:
            inputs = self._random_crop(inputs)
        actions = batch[ACTION]
        expected = (self.config.chunk_size, self.action_dim)
        if actions.ndim != 3 or tuple(actions.shape[1:]) != expected:
            raise ValueError(
                f"{ACTION}: expected shape (B, {expected[0]}, {expected[1]}), got {tuple(actions.shape)}"
            )
        _check_finite(ACTION, actions)
        padded_actions = pad_vector(actions.float(), self.config.max_action_dim)

        losses = self.model(inputs, padded_actions, noise=noise, time=time)
        losses = losses[:, :, : self.action_dim]  # drop padded action dims
        step_valid = (
            ~batch["action_is_pad"] if "action_is_pad" in batch else torch.ones_like(losses[..., 0]).bool()
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
        inputs = self._prepare_inputs(batch)
        shape = (inputs.state.shape[0], self.config.chunk_size, self.config.max_action_dim)
        if noise is None:
            noise = torch.randn(shape, device=inputs.state.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
        rtc_kwargs = self._rtc_kwargs(inference_delay, prev_chunk_left_over, execution_horizon)
        actions = self.model.sample_actions(inputs, noise.float(), **rtc_kwargs)
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
        """
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


# Camera matrices are metric and must reach the policy as recorded; one that was normalised (or is
# simply not a camera matrix) fails these checks instead of silently bending the 3D positions. A focal
# length may be negative: a mirrored image (LIBERO's, see envs/libero_rgbd.py) has fx < 0 and
# back-projects exactly with it.
def _check_pinhole(key: str, intrinsics: Tensor) -> None:
    last_row = intrinsics.new_tensor([0.0, 0.0, 1.0])
    focal = intrinsics[..., [0, 1], [0, 1]]
    if not (
        torch.allclose(intrinsics[..., 2, :], last_row.expand_as(intrinsics[..., 2, :]))
        and (focal != 0).all()
    ):
        raise ValueError(
            f"{key} is not a pinhole matrix [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy != 0 (got "
            f"{intrinsics.reshape(-1, 3, 3)[0].tolist()}). Camera matrices must reach the policy as recorded: "
            "were they normalised?"
        )


def _check_rigid_transform(key: str, extrinsics: Tensor) -> None:
    rotation = extrinsics[..., :3, :3]
    identity = torch.eye(3, device=extrinsics.device).expand_as(rotation)
    with torch.autocast(extrinsics.device.type, enabled=False):  # a float32 check under bf16 training
        gram = rotation @ rotation.transpose(-1, -2)
    last_row = extrinsics.new_tensor([0.0, 0.0, 0.0, 1.0]).expand_as(extrinsics[..., 3, :])
    if not (torch.allclose(extrinsics[..., 3, :], last_row) and torch.allclose(gram, identity, atol=1e-3)):
        raise ValueError(
            f"{key} is not a rigid camera-to-world transform [[R, t], [0, 0, 0, 1]] with R a rotation (got "
            f"{extrinsics.reshape(-1, 4, 4)[0].tolist()}). Camera matrices must reach the policy as recorded: "
            "were they normalised?"
        )


def _check_finite(key: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{key} contains NaN or inf values.")
