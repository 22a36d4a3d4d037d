"""Configuration of the llava3d_fusion policy (registered with LeRobot as ``llava3d_fusion``)."""

import logging
import math
from dataclasses import dataclass, field

from lerobot.configs import (
    DEPTH_METER_UNIT,
    DEPTH_MILLIMETER_UNIT,
    FeatureType,
    NormalizationMode,
    PolicyFeature,
    PreTrainedConfig,
)
from lerobot.optim import CosineDecayWithWarmupSchedulerConfig
from lerobot.policies.rtc.configuration_rtc import RTCConfig

from lerobot_llava3d_fusion.geometry.robot_depth import check_depth_features, is_depth_map
from lerobot_llava3d_fusion.geometry.sources import GEOMETRY_SOURCES, GeometrySource
from lerobot_llava3d_fusion.observation_keys import camera_name
from lerobot_llava3d_fusion.optim import FusedAdamWConfig

# Special value of `vlm_model_name`: a tiny random LLaVA backbone built from code, tokenizer
# included, for tests, demos and benchmarks that must run offline.
TINY_VLM_NAME = "tiny"

EXPERT_MODES = ("shared", "separate")
GEOMETRY_TARGETS = ("prefix", "expert")
# "sinusoidal": sinusoidal 3D encoding + MLP added to the projected patch tokens through a gate;
# "llava3d_mlp": LLaVA-3D's learned MLP on xyz added to the vision tower's features before the projector.
GEOMETRY_ENCODERS = ("sinusoidal", "llava3d_mlp")
GEOMETRY_PATCH_POINTS = ("nearest", "mean")
GEOMETRY_ORIGINS = ("world", "state")
# Cameras added by `empty_cameras` (pi0's naming): absent from datasets and robots, masked out.
EMPTY_CAMERA_PREFIX = "observation.images.empty_camera_"
TIME_SAMPLINGS = ("beta", "uniform")
# (scale, offset) of the training times when the config leaves them None: pi0's for Beta, the original
# system's whole [0, 1] for uniform.
DEFAULT_TIME_RANGES = {"beta": (0.999, 0.001), "uniform": (1.0, 0.0)}
TINY_LLM_TYPES = ("qwen2", "llama", "mistral")
DTYPE_NAMES = ("float32", "bfloat16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

logger = logging.getLogger(__name__)


@PreTrainedConfig.register_subclass("llava3d_fusion")
@dataclass
class Llava3DFusionConfig(PreTrainedConfig):
    """A LLaVA-family VLM whose action expert is fused into every transformer layer.

    Prefix = image patch tokens of every camera + task tokens; suffix = [state] [H noisy actions]
    [time]; one joint attention per layer; flow-matching loss; Euler sampling from a prefix KV cache.
    """

    # Input / output structure.
    n_obs_steps: int = 1
    chunk_size: int = 50  # the action horizon H
    n_action_steps: int = 50
    # Training: the last frames of every episode that `lerobot-train`'s sampler leaves out (its
    # EpisodeAwareSampler reads this attribute). Their actions still train, inside the chunks of the
    # frames before them; only their observations are no longer samples.
    drop_n_last_frames: int = 0

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )

    # Shorter state / action vectors are zero-padded so one model serves several robots.
    max_state_dim: int = 32
    max_action_dim: int = 32

    # Backbone: a Hub id or local directory of a LLaVA-family checkpoint, or "tiny".
    vlm_model_name: str = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    load_vlm_weights: bool = True
    # Only for vlm_model_name="tiny": the decoder family of the tiny random LLM.
    tiny_llm_type: str = "qwen2"
    # Original LLaVA-3D checkpoints carry only the LLM: the vision tower comes from this SigLIP/CLIP
    # checkpoint (Hub id or local directory).
    vision_tower_name: str | None = None
    # Keep only the first N LLM layers (<= 0: all of them).
    num_vlm_layers: int = -1
    # Average-pool image patch tokens over k x k neighbourhoods (1 = no pooling) to bound the prefix.
    image_pooling: int = 1
    dtype: str = "float32"

    # 3D geometry (LLaVA-3D): per-patch 3D points, encoded and added to the patch tokens through a
    # zero-initialised gate. "depth": from observation.depth.<cam> + intrinsics; "estimator": depth
    # from a monocular depth-estimation model (`depth_estimator_name`); "none": a plain 2D VLA.
    geometry: str = "none"
    # "prefix": geometry enters every layer through the VLM's patch tokens; "expert": the VLM
    # stays 2D and 3D-aware patch tokens are given to the action expert only.
    geometry_target: str = "prefix"
    # Fallback camera matrices by camera name (<cam> of observation.images.<cam>), used when the
    # batch carries no observation.intrinsics.<cam> / observation.extrinsics.<cam>.
    camera_intrinsics: dict[str, list[list[float]]] = field(default_factory=dict)
    camera_extrinsics: dict[str, list[list[float]]] = field(default_factory=dict)
    depth_estimator_name: str | None = None
    geometry_max_depth: float = 10.0  # metres; farther (or non-finite, <= 0) depth is ignored
    # A camera's depth map with no usable pixel (all 0, negative or non-finite) is an error; True accepts
    # such frames (real sensors drop some) with a warning and a running count: the camera then gets no 3D
    # points for that sample. (Depth entirely beyond geometry_max_depth is a unit error either way.)
    allow_missing_depth: bool = False
    # Unit of the recorded depth maps (observation.depth.<cam>) in training batches: "m" for a dataset
    # loaded with --dataset.depth_output_unit=m, "mm" for LeRobot's default and for the streaming reader
    # (--dataset.streaming=true, millimetres whatever depth_output_unit says). Observations at inference
    # (environments: metres; robots' <cam>_depth: converted by the preprocessor) are not affected.
    dataset_depth_unit: str = DEPTH_METER_UNIT
    # Initial value of the per-channel geometry gate: 0 leaves a pretrained VLM unchanged at the
    # start; a backbone trained from scratch (the demo's) learns to use geometry far sooner at 1.
    geometry_gate_init: float = 0.0
    # How 3D patches are built (README "Geometry"). The encoder: "llava3d_mlp" (LLaVA-3D's position MLP
    # on the vision width, added to the tower's features before the projector; an original LLaVA-3D
    # checkpoint's pretrained MLP is loaded into it and used without a gate) or "sinusoidal" (after the
    # projector, gated). None: "llava3d_mlp" for an original LLaVA-3D checkpoint, "sinusoidal" otherwise.
    geometry_encoder: str | None = None
    # A patch's point: "nearest" (nearest resize of the xyz map to the patch grid, as LLaVA-3D) or "mean"
    # (mean of the patch's valid pixels). None: "nearest" with llava3d_mlp, "mean" with sinusoidal.
    geometry_patch_points: str | None = None
    # Points per patch side (s): each patch is split into s x s cells, each taking its point by
    # geometry_patch_points, and the sinusoidal encoder sees all s * s of them, so edges inside a patch
    # are located to 1/s of a patch. 1: one point per patch. Needs the sinusoidal encoder, no voxels.
    geometry_samples_per_patch_side: int = 1
    # Voxel pooling (metres; None: off): the patches of all cameras whose points fall in one voxel are
    # averaged into one token before the projector (LLaVA-3D used 0.2 m on room-scale scenes).
    geometry_voxel_size: float | None = None
    # Where the 3D points are measured from: "world" (the extrinsics' frame; the camera's without them)
    # or "state": the position in observation.state[geometry_origin_state_indices] (raw, before
    # normalization), e.g. the end-effector's, which must be given in that same world frame. Each point
    # is then its offset from that position (a translation, no rotation): the geometry says directly
    # where things are relative to the end-effector, which the actions move.
    geometry_origin: str = "world"
    geometry_origin_state_indices: tuple[int, int, int] = (0, 1, 2)

    # Action expert.
    expert_mode: str = "separate"  # "shared": the LLM's own layers; "separate": a narrower expert stack
    expert_width_multiplier: float = 0.5
    # MLP width of the expert relative to the LLM's (None: the same as expert_width_multiplier).
    expert_mlp_multiplier: float | None = None
    use_state_token: bool = True

    # Language.
    tokenizer_max_length: int = 48

    # Flow matching.
    num_steps: int = 10  # Euler steps at inference
    use_cache: bool = True  # reuse the prefix KV cache across Euler steps
    # torch.compile the cached denoising step (the per-Euler-step work); "reduce-overhead" also
    # replays it as a CUDA graph on GPUs. The first call of each shape pays the compilation.
    compile_model: bool = False
    compile_mode: str = "default"
    # Training times: "beta" (pi0's Beta(alpha, beta) * scale + offset) or "uniform" (U(offset, offset +
    # scale)). scale / offset None: 0.999 / 0.001 for "beta" (pi0 keeps t away from 0), 1 / 0 for
    # "uniform" (the whole [0, 1], as the original system samples it).
    time_sampling: str = "beta"
    time_sampling_beta_alpha: float = 1.5
    time_sampling_beta_beta: float = 1.0
    time_sampling_scale: float | None = None
    time_sampling_offset: float | None = None
    min_period: float = 4e-3
    max_period: float = 4.0

    # Training augmentation: a random crop of this fraction of each image side, resized back, applied
    # to every camera with its depth and intrinsics alike (1.0: off). LeRobot's dataset transforms
    # (`--dataset.image_transforms`) move RGB only: keep their `affine` off with geometry.
    augment_crop_scale: float = 1.0
    # Training augmentation: recorded depth made sensor-like (a RealSense D400's distance-squared
    # noise, holes at edges and at random, 1 mm steps; `geometry/depth_noise.py`) before it is
    # back-projected, so that a policy trained in simulation meets real depth prepared. Needs
    # geometry="depth".
    augment_depth_noise: bool = False

    # Finetuning.
    freeze_vision_encoder: bool = True
    train_expert_only: bool = False

    # LeRobot VLA features, as pi0 / pi05 / smolvla name them.
    # Real-time chunking (`lerobot-rollout --inference.type=rtc` sets it; None: plain chunking).
    rtc_config: RTCConfig | None = None
    # Recompute each fused layer's activations in the backward pass instead of storing them.
    gradient_checkpointing: bool = False
    # Extra cameras `observation.images.empty_camera_<i>` that no dataset or robot provides: their
    # image tokens are masked out, so a checkpoint with more cameras serves a robot with fewer.
    empty_cameras: int = 0
    # Train on actions relative to the current state (LeRobot's RelativeActionsProcessorStep) and
    # return absolute actions; joints named in relative_exclude_joints stay absolute.
    use_relative_actions: bool = False
    relative_exclude_joints: list[str] = field(default_factory=lambda: ["gripper"])
    action_feature_names: list[str] | None = None  # filled in from the dataset by make_policy

    # Training presets.
    optimizer_lr: float = 1e-4
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-10
    optimizer_grad_clip_norm: float = 10.0
    optimizer_fused: bool = True  # torch's fused AdamW kernel (one pass per parameter)
    scheduler_warmup_steps: int = 1_000
    scheduler_decay_steps: int = 30_000
    scheduler_decay_lr: float = 2.5e-6

    def __post_init__(self):
        try:
            self._validate_fields()
        except ValueError as error:
            # draccus (lerobot-train's and lerobot-eval's parser, and config.json loading) replaces this
            # error with a bare "Couldn't instantiate class Llava3DFusionConfig": log the field's own
            # message so that the user sees it.
            logger.error("invalid llava3d_fusion config: %s", error)
            raise

    def _validate_fields(self) -> None:
        super().__post_init__()
        self._validate_training_presets()
        if self.n_action_steps > self.chunk_size:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) cannot exceed chunk_size ({self.chunk_size}): "
                "a chunk is the most actions one model call produces."
            )
        if self.n_action_steps < 1 or self.chunk_size < 1:
            raise ValueError(
                f"chunk_size ({self.chunk_size}) and n_action_steps ({self.n_action_steps}) must be >= 1."
            )
        if self.drop_n_last_frames < 0:
            raise ValueError(f"drop_n_last_frames must be >= 0 (got {self.drop_n_last_frames}).")
        if self.n_obs_steps != 1:
            raise ValueError(f"n_obs_steps must be 1 (got {self.n_obs_steps}): the policy sees one frame.")
        _check_choice("expert_mode", self.expert_mode, EXPERT_MODES)
        _check_choice("time_sampling", self.time_sampling, TIME_SAMPLINGS)
        _check_choice("tiny_llm_type", self.tiny_llm_type, TINY_LLM_TYPES)
        _check_choice("geometry", self.geometry, tuple(GEOMETRY_SOURCES))
        _check_choice("geometry_target", self.geometry_target, GEOMETRY_TARGETS)
        self._validate_3d_patches()
        self.geometry_source.check_config(self)
        _check_choice("dtype", self.dtype, DTYPE_NAMES)
        if not 0.0 < self.expert_width_multiplier <= 1.0:
            raise ValueError(
                f"expert_width_multiplier must be in (0, 1] (got {self.expert_width_multiplier})."
            )
        if self.image_pooling < 1:
            raise ValueError(f"image_pooling must be >= 1 (got {self.image_pooling}).")
        if self.expert_mlp_multiplier is not None and not 0.0 < self.expert_mlp_multiplier <= 1.0:
            raise ValueError(f"expert_mlp_multiplier must be in (0, 1] (got {self.expert_mlp_multiplier}).")
        if self.num_steps < 1:
            raise ValueError(f"num_steps (Euler steps) must be >= 1 (got {self.num_steps}).")
        if not math.isfinite(self.geometry_gate_init):
            raise ValueError(f"geometry_gate_init must be finite (got {self.geometry_gate_init}).")
        if self.max_state_dim < 1 or self.max_action_dim < 1:
            raise ValueError("max_state_dim and max_action_dim must be >= 1.")
        if self.tokenizer_max_length < 1:
            raise ValueError(f"tokenizer_max_length must be >= 1 (got {self.tokenizer_max_length}).")
        _check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        if not 0.0 < self.augment_crop_scale <= 1.0:
            raise ValueError(f"augment_crop_scale must be in (0, 1] (got {self.augment_crop_scale}).")
        if not isinstance(self.augment_depth_noise, bool):
            raise ValueError(f"augment_depth_noise must be true or false (got {self.augment_depth_noise!r}).")
        if self.augment_depth_noise and self.geometry != "depth":
            raise ValueError(
                "augment_depth_noise makes recorded depth sensor-like: it needs geometry='depth' "
                f"(got geometry={self.geometry!r})."
            )
        _check_choice(
            "dataset_depth_unit", self.dataset_depth_unit, (DEPTH_METER_UNIT, DEPTH_MILLIMETER_UNIT)
        )
        if not 0.0 < self.geometry_max_depth:
            raise ValueError(f"geometry_max_depth must be > 0 metres (got {self.geometry_max_depth}).")
        for name, matrices, size in (
            ("camera_intrinsics", self.camera_intrinsics, 3),
            ("camera_extrinsics", self.camera_extrinsics, 4),
        ):
            for camera, matrix in matrices.items():
                if len(matrix) != size or any(len(row) != size for row in matrix):
                    raise ValueError(f"{name}[{camera!r}] must be a {size}x{size} matrix (got {matrix}).")
        if not 0.0 < self.min_period < self.max_period:
            raise ValueError(
                f"need 0 < min_period < max_period (got min_period={self.min_period}, "
                f"max_period={self.max_period})."
            )
        if self.time_sampling_beta_alpha <= 0 or self.time_sampling_beta_beta <= 0:
            raise ValueError(
                "time_sampling_beta_alpha and time_sampling_beta_beta must be > 0 (got "
                f"{self.time_sampling_beta_alpha}, {self.time_sampling_beta_beta})."
            )
        scale, offset = self.time_sampling_range
        if not (0.0 <= offset and 0.0 < scale and offset + scale <= 1.0 + 1e-9):
            raise ValueError(
                "training times must lie in [0, 1]: need time_sampling_offset >= 0, time_sampling_scale > 0 "
                f"and their sum <= 1 (got {offset} and {scale})."
            )
        if self.empty_cameras < 0:
            raise ValueError(f"empty_cameras must be >= 0 (got {self.empty_cameras}).")
        if self.rtc_config is not None and self.rtc_config.execution_horizon > self.chunk_size:
            raise ValueError(
                f"rtc_config.execution_horizon ({self.rtc_config.execution_horizon}) cannot exceed "
                f"chunk_size ({self.chunk_size})."
            )
        if self.train_expert_only and self.expert_mode == "shared":
            raise ValueError(
                "train_expert_only=True with expert_mode='shared' would freeze the layers the expert runs "
                "through (they are the LLM's own): use expert_mode='separate' or train_expert_only=False."
            )

    def _validate_training_presets(self) -> None:
        """The optimizer and scheduler fields, which otherwise fail (or silently misbehave) only once
        training has started."""
        if not (math.isfinite(self.optimizer_lr) and self.optimizer_lr > 0):
            raise ValueError(f"optimizer_lr must be a finite number > 0 (got {self.optimizer_lr}).")
        if not (math.isfinite(self.optimizer_weight_decay) and self.optimizer_weight_decay >= 0):
            raise ValueError(
                f"optimizer_weight_decay must be a finite number >= 0 (got {self.optimizer_weight_decay})."
            )
        if len(self.optimizer_betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.optimizer_betas):
            raise ValueError(
                "optimizer_betas must be two numbers in [0, 1), e.g. (0.9, 0.95) "
                f"(got {self.optimizer_betas})."
            )
        if not (math.isfinite(self.optimizer_eps) and self.optimizer_eps > 0):
            raise ValueError(f"optimizer_eps must be a finite number > 0 (got {self.optimizer_eps}).")
        if not self.optimizer_grad_clip_norm > 0:  # inf is allowed: no clipping
            raise ValueError(
                f"optimizer_grad_clip_norm must be > 0 (got {self.optimizer_grad_clip_norm}); use a large "
                "value (or inf) to effectively disable clipping."
            )
        if self.scheduler_warmup_steps < 0:
            raise ValueError(f"scheduler_warmup_steps must be >= 0 (got {self.scheduler_warmup_steps}).")
        if self.scheduler_decay_steps < 1:
            raise ValueError(f"scheduler_decay_steps must be >= 1 (got {self.scheduler_decay_steps}).")
        if not (math.isfinite(self.scheduler_decay_lr) and self.scheduler_decay_lr >= 0):
            raise ValueError(
                f"scheduler_decay_lr must be a finite number >= 0 (got {self.scheduler_decay_lr})."
            )

    def _validate_3d_patches(self) -> None:
        if self.geometry_encoder is not None:
            _check_choice("geometry_encoder", self.geometry_encoder, GEOMETRY_ENCODERS)
        if self.geometry_patch_points is not None:
            _check_choice("geometry_patch_points", self.geometry_patch_points, GEOMETRY_PATCH_POINTS)
        samples = self.geometry_samples_per_patch_side
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"geometry_samples_per_patch_side must be a positive int (got {samples!r}).")
        if samples > 1 and self.geometry_encoder == "llava3d_mlp":
            raise ValueError(
                "geometry_samples_per_patch_side > 1 needs geometry_encoder='sinusoidal' (LLaVA-3D's position "
                "MLP takes one point per patch)."
            )
        if samples > 1 and self.geometry_voxel_size is not None:
            raise ValueError(
                "geometry_samples_per_patch_side > 1 cannot be combined with geometry_voxel_size (voxels pool "
                "one point per patch)."
            )
        _check_choice("geometry_origin", self.geometry_origin, GEOMETRY_ORIGINS)
        if self.geometry_origin == "state":
            indices = tuple(self.geometry_origin_state_indices)
            if (
                len(indices) != 3
                or len(set(indices)) != 3
                or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices)
            ):
                raise ValueError(
                    "geometry_origin_state_indices must be 3 distinct non-negative state indices (x, y, z), "
                    f"got {self.geometry_origin_state_indices!r}."
                )
            if not self.geometry_source.needs_3d_encoder:
                raise ValueError(
                    f"geometry_origin='state' moves the origin of 3D points, but geometry={self.geometry!r} "
                    "makes none."
                )
        voxel = self.geometry_voxel_size
        if voxel is None:
            return
        if (
            isinstance(voxel, bool)
            or not isinstance(voxel, (int, float))
            or not math.isfinite(voxel)
            or voxel <= 0
        ):
            raise ValueError(
                f"geometry_voxel_size must be a positive number of metres or None (got {voxel!r})."
            )
        if not self.geometry_source.needs_3d_encoder:
            with_points = " or ".join(
                repr(name) for name, source in GEOMETRY_SOURCES.items() if source.needs_3d_encoder
            )
            raise ValueError(f"geometry_voxel_size needs 3D points: set geometry to {with_points}.")
        if self.geometry_target != "prefix":
            raise ValueError(
                "geometry_voxel_size pools the VLM's image tokens: it needs geometry_target='prefix' "
                f"(got {self.geometry_target!r})."
            )
        if self.image_pooling != 1:
            raise ValueError(
                f"geometry_voxel_size replaces image_pooling: set image_pooling=1 (got {self.image_pooling})."
            )

    def validate_features(self) -> None:
        # pi0's empty cameras; their size is irrelevant (the model resizes, and masks their tokens).
        image_shape = next(
            (ft.shape for key, ft in (self.input_features or {}).items() if key in self.camera_keys),
            (3, 224, 224),
        )
        for index in range(self.empty_cameras):
            self.input_features[f"{EMPTY_CAMERA_PREFIX}{index}"] = PolicyFeature(
                type=FeatureType.VISUAL, shape=image_shape
            )
        if not self.camera_keys:
            raise ValueError(
                "llava3d_fusion needs at least one camera: no VISUAL feature (observation.images.*) in "
                f"input_features {sorted(self.input_features or {})}."
            )
        if self.action_feature is None:
            raise ValueError(
                f"llava3d_fusion needs an 'action' output feature; output_features are "
                f"{sorted(self.output_features or {})}."
            )
        action_dim = self.action_feature.shape[-1]
        if action_dim > self.max_action_dim:
            raise ValueError(f"action dim {action_dim} exceeds max_action_dim ({self.max_action_dim}).")
        state = self.robot_state_feature
        if state is not None and state.shape[-1] > self.max_state_dim:
            raise ValueError(f"state dim {state.shape[-1]} exceeds max_state_dim ({self.max_state_dim}).")

        if self.geometry_origin == "state":
            state_dim = state.shape[-1] if state is not None else 0
            if max(self.geometry_origin_state_indices) >= state_dim:
                raise ValueError(
                    f"geometry_origin_state_indices {tuple(self.geometry_origin_state_indices)} need a state of "
                    f"at least {max(self.geometry_origin_state_indices) + 1} dims; observation.state has "
                    f"{state_dim}."
                )

        check_depth_features(self.input_features or {})  # every depth map belongs to a camera
        cameras = {camera_name(key) for key in self.camera_keys}
        for name, matrices in (
            ("camera_intrinsics", self.camera_intrinsics),
            ("camera_extrinsics", self.camera_extrinsics),
        ):
            unknown = sorted(set(matrices) - cameras)
            if unknown:
                raise ValueError(
                    f"{name} names cameras {unknown} the policy does not have; its cameras: {sorted(cameras)}."
                )
        self.geometry_source.check_features(self.geometry_camera_keys, self.input_features)

    @property
    def time_sampling_range(self) -> tuple[float, float]:
        """(scale, offset) of the training times: the fields, or `time_sampling`'s defaults where None."""
        scale, offset = DEFAULT_TIME_RANGES[self.time_sampling]
        return (
            scale if self.time_sampling_scale is None else self.time_sampling_scale,
            offset if self.time_sampling_offset is None else self.time_sampling_offset,
        )

    @property
    def camera_keys(self) -> list[str]:
        """RGB camera feature keys in a fixed order (the order of `input_features`).

        Depth maps are VISUAL features too when they come from a LeRobot dataset; they belong to
        their camera (`observation.depth.<cam>`, or a LeRobot robot's `observation.images.<cam>_depth`,
        see `robot_depth.py`) and are not cameras of their own.
        """
        return [
            key
            for key, ft in (self.input_features or {}).items()
            if ft.type is FeatureType.VISUAL and not is_depth_map(key, ft)
        ]

    @property
    def geometry_source(self) -> GeometrySource:
        """Where cameras' depth comes from, by `geometry` (`geometry/sources.py`)."""
        return GEOMETRY_SOURCES[self.geometry]

    @property
    def geometry_camera_keys(self) -> list[str]:
        """Cameras that get 3D points, as the geometry source decides (empty cameras never do)."""
        cameras = [key for key in self.camera_keys if not key.startswith(EMPTY_CAMERA_PREFIX)]
        return self.geometry_source.camera_keys(cameras, self.input_features or {})

    def get_optimizer_preset(self) -> FusedAdamWConfig:
        return FusedAdamWConfig(
            lr=self.optimizer_lr,
            betas=self.optimizer_betas,
            eps=self.optimizer_eps,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
            fused=self.optimizer_fused,
        )

    def get_scheduler_preset(self) -> CosineDecayWithWarmupSchedulerConfig:
        return CosineDecayWithWarmupSchedulerConfig(
            peak_lr=self.optimizer_lr,
            decay_lr=self.scheduler_decay_lr,
            num_warmup_steps=self.scheduler_warmup_steps,
            num_decay_steps=self.scheduler_decay_steps,
        )

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
