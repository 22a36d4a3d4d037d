"""Shared pieces of the benchmarks: matched sizes, policy builders, inputs, timing and output.

Both policies are built with random weights (nothing is downloaded) at the SAME sizes: cameras,
image size, prompt length, chunk size, Euler steps, vision tower, LLM and expert sizes. pi0's sizes
come from LeRobot's own `get_gemma_config`; ours are written into a local LLaVA checkpoint directory
(config + tokenizer + image processor, no weights) that `Llava3DFusionConfig(vlm_model_name=dir,
load_vlm_weights=False)` loads like any other checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import lerobot
import numpy as np
import torch
import transformers
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.pi0 import modeling_pi0
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy
from lerobot.utils.constants import (
    ACTION,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
)
from packaging.requirements import Requirement
from torch import nn
from transformers import LlamaConfig, SiglipImageProcessor, SiglipVisionConfig

from lerobot_llava3d_fusion import Llava3DFusionConfig
from lerobot_llava3d_fusion.backbones.backbone import vision_transformer
from lerobot_llava3d_fusion.backbones.loading import build_tiny_tokenizer, siglip_llava_config
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = ("ours", "pi0")

# The project's targets, each a ratio measured in one run: (description, comparison, threshold).
TARGETS = {
    "nocache_over_cache_latency": ("use_cache=false / use_cache=true latency", ">=", 3.0),
    "ours_over_pi0_latency": ("ours / pi0 latency", "<=", 0.8),
    "ours_over_pi0_train_samples_per_s": ("ours / pi0 training samples/s", ">=", 1.2),
    "ours_over_pi0_peak_memory": ("ours / pi0 peak training memory", "<=", 1.0),
    "ours_over_pi0_inference_peak_memory": ("ours / pi0 peak inference memory", "<=", 1.0),
    "sampling_fraction_of_matmul_peak": ("cached sampling FLOP/s / dense matmul FLOP/s", ">=", 0.4),
    "checkpointed_over_plain_peak_memory": (
        "gradient checkpointing / without: peak training memory",
        "<=",
        0.6,
    ),
}


# ------------------------------------------------------------------------------------- matched sizes


@dataclass(frozen=True)
class DecoderSize:
    """A decoder stack, in the fields of pi0's `GemmaConfig` (openpi's names)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VisionSize:
    """A SigLIP vision tower."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class MatchedSizes:
    """Everything the two policies are matched on."""

    vision: VisionSize
    llm: DecoderSize
    expert: DecoderSize
    vocab_size: int = 257_152  # PaliGemma's (pi0 hard-codes it); ours gets the same embedding table
    cameras: int = 2
    prompt_length: int = 48
    chunk_size: int = 50
    num_steps: int = 10
    max_state_dim: int = 32
    max_action_dim: int = 32
    state_dim: int = 8  # LIBERO's state and action sizes
    action_dim: int = 7

    @property
    def camera_keys(self) -> list[str]:
        return [f"observation.images.cam{i}" for i in range(self.cameras)]


def _pi0_size(variant: str) -> DecoderSize:
    gemma = modeling_pi0.get_gemma_config(variant)
    return DecoderSize(**{f.name: getattr(gemma, f.name) for f in dataclasses.fields(DecoderSize)})


# PaliGemma's SigLIP So400m/14 at 224 as pi0 builds it (PaliGemmaConfig defaults + pi0's mlp 4304).
_SIGLIP_SO400M_224 = VisionSize(
    width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224
)
_FULL = MatchedSizes(vision=_SIGLIP_SO400M_224, llm=_pi0_size("gemma_2b"), expert=_pi0_size("gemma_300m"))
# "small": the same token counts (2 cameras x 256 patches, 48 prompt tokens, 52/51 suffix tokens,
# 10 steps), 1/9 of every depth, half of every decoder width and head dim (pi0 needs 8 heads), a
# SigLIP-B-wide tower and a 16k vocabulary (embeddings stay ~15% of our parameters, as at "full"),
# so that one run of a script takes a few minutes on 2 CPU cores.
_SMALL = dataclasses.replace(
    _FULL,
    vision=VisionSize(width=768, depth=3, mlp_dim=3072, num_heads=12, patch_size=14, image_size=224),
    llm=DecoderSize(width=1024, depth=2, mlp_dim=8192, num_heads=8, num_kv_heads=1, head_dim=128),
    expert=DecoderSize(width=512, depth=2, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=128),
    vocab_size=16_384,
)
# "tiny": a check that a script runs (~0.2 M parameters per policy, seconds on a CPU), not a
# measurement: 2 cameras of 32x32 pixels (4 x 4 patches each), an 8-token prompt, a chunk of 4 actions
# and 2 Euler steps.
_TINY = dataclasses.replace(
    _FULL,
    vision=VisionSize(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, image_size=32),
    llm=DecoderSize(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=8),
    expert=DecoderSize(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=8),
    vocab_size=512,
    prompt_length=8,
    chunk_size=4,
    num_steps=2,
)
PRESETS = {"full": _FULL, "small": _SMALL, "tiny": _TINY}


def preset_changes(name: str) -> list[str]:
    """What a preset changes relative to pi0's real sizes, for the printout."""
    real, used = _flatten(dataclasses.asdict(_FULL)), _flatten(dataclasses.asdict(PRESETS[name]))
    return [f"{key}: {real[key]} -> {used[key]}" for key in real if real[key] != used[key]]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ------------------------------------------------------------------------------------ command line


def parse_args(description: str, script: str, add_arguments: Callable | None = None) -> argparse.Namespace:
    """The options every benchmark takes, plus the script's own (`add_arguments(parser)`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights dtype of both policies (each its own bf16 mode)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model sizes; default: small on cpu, full on cuda",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads, the same for every model (default: all cores)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "bench" / f"{script}.json")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.preset is None:
        args.preset = "small" if args.device == "cpu" else "full"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


def setup(args: argparse.Namespace) -> torch.device:
    """Fix threads and seeds; return the device."""
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    return torch.device(args.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_info(args: argparse.Namespace) -> dict:
    """Where and how the numbers were taken."""
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()} cpu ({torch.backends.cpu.get_cpu_capability()})"
    )
    return {
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "preset": args.preset,
        "preset_changes": preset_changes(args.preset),
        "threads": torch.get_num_threads(),
        # Other processes on the machine slow multi-threaded CPU timings a lot (and unevenly).
        "cpu_load_1min_at_start": os.getloadavg()[0],
        "seed": args.seed,
        "batch_size": args.batch_size,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "lerobot": lerobot.__version__,
            "python": platform.python_version(),
        },
        "sizes": dataclasses.asdict(PRESETS[args.preset]),
    }


# --------------------------------------------------------------------------------------- builders


def _features(sizes: MatchedSizes) -> tuple[dict, dict]:
    size = sizes.vision.image_size
    inputs = {key: PolicyFeature(FeatureType.VISUAL, (3, size, size)) for key in sizes.camera_keys}
    inputs[OBS_STATE] = PolicyFeature(FeatureType.STATE, (sizes.state_dim,))
    outputs = {ACTION: PolicyFeature(FeatureType.ACTION, (sizes.action_dim,))}
    return inputs, outputs


def write_llava_checkpoint(sizes: MatchedSizes, directory: Path) -> Path:
    """A LLaVA checkpoint directory without weights: SigLIP tower + Llama LLM at the Gemma sizes.

    Llama, like Gemma, has no q/k/v bias and takes an explicit head_dim, so the attention and MLP
    matrices have exactly the Gemma shapes; only the MLP activation (SiLU vs GELU-tanh) differs.
    """
    tokenizer = build_tiny_tokenizer()
    llm, vision = sizes.llm, sizes.vision
    text_config = LlamaConfig(
        vocab_size=sizes.vocab_size,
        hidden_size=llm.width,
        intermediate_size=llm.mlp_dim,
        num_hidden_layers=llm.depth,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_dim,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=vision.width,
        intermediate_size=vision.mlp_dim,
        num_hidden_layers=vision.depth,
        num_attention_heads=vision.num_heads,
        patch_size=vision.patch_size,
        image_size=vision.image_size,
        vision_use_head=False,  # PaliGemma's tower has no attention-pooling head either
    )
    siglip_llava_config(text_config, vision_config, image_token_id=tokenizer.pad_token_id).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    size = {"height": vision.image_size, "width": vision.image_size}
    SiglipImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    return directory


def build_ours(
    sizes: MatchedSizes,
    device: torch.device,
    dtype: str,
    seed: int,
    freeze_vision_encoder: bool = False,
    extra_inputs: dict | None = None,
    config_fields: dict | None = None,
    backbone_dir: Path | None = None,
) -> Llava3DFusionPolicy:
    """Our policy with random weights at `sizes` (a separate expert of the pi0 expert's sizes);
    `extra_inputs` are input features besides pi0's (e.g. depth), `config_fields` further
    Llava3DFusionConfig fields (e.g. {"gradient_checkpointing": True}, {"geometry": "depth"}).
    The backbone's files are written to `backbone_dir`, to save the policy later, or to a temporary
    folder."""
    inputs, outputs = _features(sizes)
    inputs.update(extra_inputs or {})
    fields = {
        "geometry": "none",  # a plain 2D VLA like pi0: no 3D points, every patch token kept
        "image_pooling": 1,
        **(config_fields or {}),
    }
    with tempfile.TemporaryDirectory(prefix="llava_bench_") as directory:
        config = Llava3DFusionConfig(
            vlm_model_name=write_llava_checkpoint(sizes, Path(backbone_dir or directory)).as_posix(),
            load_vlm_weights=False,
            expert_mode="separate",
            expert_width_multiplier=sizes.expert.width / sizes.llm.width,
            expert_mlp_multiplier=sizes.expert.mlp_dim / sizes.llm.mlp_dim,
            chunk_size=sizes.chunk_size,
            n_action_steps=sizes.chunk_size,
            num_steps=sizes.num_steps,
            max_state_dim=sizes.max_state_dim,
            max_action_dim=sizes.max_action_dim,
            tokenizer_max_length=sizes.prompt_length,
            freeze_vision_encoder=freeze_vision_encoder,
            dtype=dtype,
            device=device.type,
            input_features=inputs,
            output_features=outputs,
            **fields,
        )
        seed_everything(seed)
        with torch.device(device):  # initialise on the device: minutes less for 4B parameters on a GPU
            policy = Llava3DFusionPolicy(config)
    return policy.to(device)


@contextlib.contextmanager
def pi0_sized(sizes: MatchedSizes) -> Iterator[None]:
    """Make pi0 build its Gemma variants, SigLIP tower and vocabulary at `sizes`.

    At "full" every patched value equals pi0's own, so the patches change nothing. They live inside
    LeRobot's pi0 module only, only while building: `get_gemma_config` (openpi's variant table), and
    the PaliGemma and Gemma-expert classes, whose SigLIP depth and vocabulary pi0 hard-codes.
    """
    gemma_sizes = {"gemma_2b": sizes.llm, "gemma_300m": sizes.expert}
    paligemma_cls = modeling_pi0.PaliGemmaForConditionalGenerationWithPiGemma
    expert_cls = modeling_pi0.PiGemmaForCausalLM

    def get_gemma_config(variant: str) -> modeling_pi0.GemmaConfig:
        return modeling_pi0.GemmaConfig(**dataclasses.asdict(gemma_sizes[variant]))

    def build_paligemma(config):
        config.vision_config.num_hidden_layers = sizes.vision.depth
        config.vision_config.hidden_size = sizes.vision.width
        config.vision_config.intermediate_size = sizes.vision.mlp_dim
        config.vision_config.num_attention_heads = sizes.vision.num_heads
        config.vision_config.patch_size = sizes.vision.patch_size
        config.vision_config.projection_dim = sizes.llm.width
        config.text_config.vocab_size = sizes.vocab_size
        return paligemma_cls(config)

    def build_expert(config):
        config.vocab_size = sizes.vocab_size
        return expert_cls(config)

    with (
        mock.patch.object(modeling_pi0, "get_gemma_config", get_gemma_config),
        mock.patch.object(modeling_pi0, "PaliGemmaForConditionalGenerationWithPiGemma", build_paligemma),
        mock.patch.object(modeling_pi0, "PiGemmaForCausalLM", build_expert),
    ):
        yield


def build_pi0(
    sizes: MatchedSizes, device: torch.device, dtype: str, seed: int, freeze_vision_encoder: bool = False
) -> PI0Policy:
    """LeRobot's pi0 (gemma_2b VLM + gemma_300m expert) with random weights at `sizes`."""
    inputs, outputs = _features(sizes)
    config = PI0Config(
        paligemma_variant="gemma_2b",
        action_expert_variant="gemma_300m",
        dtype=dtype,
        chunk_size=sizes.chunk_size,
        n_action_steps=sizes.chunk_size,
        num_inference_steps=sizes.num_steps,
        max_state_dim=sizes.max_state_dim,
        max_action_dim=sizes.max_action_dim,
        tokenizer_max_length=sizes.prompt_length,
        image_resolution=(sizes.vision.image_size, sizes.vision.image_size),
        freeze_vision_encoder=freeze_vision_encoder,
        device=device.type,
        input_features=inputs,
        output_features=outputs,
    )
    seed_everything(seed)
    with pi0_sized(sizes), torch.device(device):
        return PI0Policy(config)


BUILDERS = {"ours": build_ours, "pi0": build_pi0}


def pi0_unavailable() -> str | None:
    """Why LeRobot's pi0 cannot run with the installed transformers, or None: its PaliGemma code needs
    the range lerobot's `transformers-dep` extra pins (what the `libero` and `pi` extras install),
    and a plain install of this package may resolve a newer one."""
    for line in importlib.metadata.requires("lerobot") or []:
        requirement = Requirement(line)
        if requirement.name == "transformers" and requirement.marker is not None:
            if requirement.marker.evaluate({"extra": "transformers-dep"}):
                if not requirement.specifier.contains(transformers.__version__, prereleases=True):
                    return (
                        f"LeRobot's pi0 needs transformers{requirement.specifier}, installed "
                        f"{transformers.__version__}: install lerobot[pi] to compare with it"
                    )
    return None


# ------------------------------------------------------------------------------------ description


def _decoder_size(layers: nn.ModuleList) -> dict:
    attn, mlp = layers[0].self_attn, layers[0].mlp
    return {
        "width": attn.q_proj.in_features,
        "depth": len(layers),
        "mlp_dim": mlp.gate_proj.out_features,
        "num_heads": attn.q_proj.out_features // attn.head_dim,
        "num_kv_heads": attn.k_proj.out_features // attn.head_dim,
        "head_dim": attn.head_dim,
        "mlp_activation": type(mlp.act_fn).__name__,
    }


def _vision_size(tower: nn.Module) -> dict:
    config = tower.config
    return {
        "width": config.hidden_size,
        "depth": len(vision_transformer(tower).encoder.layers),
        "mlp_dim": config.intermediate_size,
        "num_heads": config.num_attention_heads,
        "patch_size": config.patch_size,
        "image_size": config.image_size,
    }


def _parts(policy: nn.Module, name: str) -> dict[str, nn.Module]:
    """The comparable parts of each policy, read off the built modules (not the configs)."""
    if isinstance(policy, Llava3DFusionPolicy):  # "ours", with any config overrides
        model = policy.model
        return {
            "vision tower": model.image_encoder.vision_tower,
            "projector": model.image_encoder.projector,
            "embeddings": model.embed_tokens,
            "llm": model.fusion.vlm_layers,
            "expert": model.fusion.expert_layers,
            "unused lm heads": nn.ModuleList(),
        }
    with_expert = policy.model.paligemma_with_expert
    pali = with_expert.paligemma.model
    return {
        "vision tower": pali.vision_tower,
        "projector": pali.multi_modal_projector,
        "embeddings": pali.language_model.embed_tokens,
        "llm": pali.language_model.layers,
        "expert": with_expert.gemma_expert.model.layers,
        # pi0 never decodes text, but builds both LM heads (untied from the embeddings).
        "unused lm heads": nn.ModuleList([with_expert.paligemma.lm_head, with_expert.gemma_expert.lm_head]),
    }


def describe(policy: nn.Module, name: str) -> dict:
    """Sizes and parameter counts (millions) of a built policy."""
    parts = _parts(policy, name)
    params = {part: sum(p.numel() for p in module.parameters()) / 1e6 for part, module in parts.items()}
    unique = {p.data_ptr(): p for p in policy.parameters()}.values()
    params["total"] = sum(p.numel() for p in unique) / 1e6
    params["trainable"] = sum(p.numel() for p in unique if p.requires_grad) / 1e6
    return {
        "vision": _vision_size(parts["vision tower"]),
        "llm": _decoder_size(parts["llm"]),
        "expert": _decoder_size(parts["expert"]),
        "vocab_size": parts["embeddings"].num_embeddings,
        "projector": " -> ".join(
            type(m).__name__ for m in parts["projector"].modules() if not list(m.children())
        ),
        "params_m": {part: round(count, 2) for part, count in params.items()},
    }


# Known differences that the module shapes above do not show.
KNOWN_DIFFERENCES = [
    "suffix tokens: ours [state][50 actions][time] = 52; pi0 [state][50 actions with time fused in] = 51",
    "attention: ours one SDPA call per layer; pi0 eager attention (matmul + softmax) with a float mask",
    (
        "sampling: ours writes the suffix K/V into a preallocated prefix cache in place; pi0 copies its "
        "DynamicCache (clone_past_key_values) every Euler step"
    ),
    "bf16: ours all weights bf16; pi0 keeps vision tower, projector and norms in fp32",
    "projector: LLaVA's 2-layer GELU MLP (ours) vs PaliGemma's single Linear (pi0)",
    "norms/embeddings: Gemma RMSNorm (1 + w) and sqrt(width) embedding scale vs Llama RMSNorm",
]


def print_comparison(descriptions: dict[str, dict]) -> None:
    """What was matched and what differs between the two built policies."""
    rows = []
    for part in ("vision", "llm", "expert"):
        for key in descriptions["ours"][part]:
            values = [descriptions[m][part][key] for m in MODELS]
            rows.append([f"{part}.{key}", *values, "same" if values[0] == values[1] else "DIFFERS"])
    for key in ("vocab_size", "projector"):
        values = [descriptions[m][key] for m in MODELS]
        rows.append([key, *values, "same" if values[0] == values[1] else "DIFFERS"])
    for part in descriptions["ours"]["params_m"]:
        rows.append([f"params (M) {part}", *[descriptions[m]["params_m"][part] for m in MODELS], ""])
    print_table("matched sizes (read off the built models)", ["", *MODELS, ""], rows)
    print("other differences:")
    for line in KNOWN_DIFFERENCES:
        print(f"  - {line}")


# ----------------------------------------------------------------------------------------- inputs


def make_batch(sizes: MatchedSizes, batch_size: int, device: torch.device, seed: int) -> dict:
    """One batch, as both policies get it after their preprocessors (token ids, not text).

    Images are float [0, 1] at the model's size (each policy maps them to SigLIP's [-1, 1]); the
    prompt is `prompt_length` real token ids below 256, valid in both vocabularies.
    """
    generator = torch.Generator().manual_seed(seed)
    size, horizon = sizes.vision.image_size, sizes.chunk_size
    batch = {key: torch.rand(batch_size, 3, size, size, generator=generator) for key in sizes.camera_keys}
    batch[OBS_STATE] = torch.randn(batch_size, sizes.state_dim, generator=generator)
    prompt = (batch_size, sizes.prompt_length)
    batch[OBS_LANGUAGE_TOKENS] = torch.randint(0, 256, prompt, generator=generator)
    batch[OBS_LANGUAGE_ATTENTION_MASK] = torch.ones(prompt, dtype=torch.bool)
    batch[ACTION] = torch.rand(batch_size, horizon, sizes.action_dim, generator=generator) * 2 - 1
    batch["action_is_pad"] = torch.zeros(batch_size, horizon, dtype=torch.bool)
    return {key: value.to(device) for key, value in batch.items()}


def make_noise(sizes: MatchedSizes, batch_size: int, device: torch.device, seed: int) -> torch.Tensor:
    """x_1 (B, chunk_size, max_action_dim), the same for both policies."""
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (batch_size, sizes.chunk_size, sizes.max_action_dim)
    return torch.randn(shape, generator=generator).to(device)


# ----------------------------------------------------------------------------------------- timing


def predictor(policy: nn.Module, batch: dict, noise: torch.Tensor, **config_overrides) -> Callable:
    """A call of `policy.predict_action_chunk` that first sets config fields (use_cache, num_steps)."""

    def call() -> torch.Tensor:
        for key, value in config_overrides.items():
            setattr(policy.config, key, value)
        return policy.predict_action_chunk(batch, noise=noise)

    return call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    calls: dict[str, Callable[[], object]], warmup: int, reps: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, taken round-robin so drift hits all of them alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def summarize(samples: list[float]) -> dict:
    """Median and spread (p10 / p90, min / max) of repeated timings, seconds."""
    values = np.asarray(samples)
    return {
        "median": float(np.median(values)),
        "p10": float(np.percentile(values, 10)),
        "p90": float(np.percentile(values, 90)),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": len(samples),
        "samples": [float(v) for v in values],
    }


def check_target(key: str, value: float) -> dict:
    description, comparison, threshold = TARGETS[key]
    met = value >= threshold if comparison == ">=" else value <= threshold
    return {"target": description, "value": value, "required": f"{comparison} {threshold}", "met": bool(met)}


# ----------------------------------------------------------------------------------------- output


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[_format(value) for value in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  " + "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            print("  " + "  ".join("-" * width for width in widths))


def print_targets(targets: dict[str, dict]) -> None:
    rows = [
        [t["target"], f"{t['value']:.3f}", t["required"], "MET" if t["met"] else "not met"]
        for t in targets.values()
    ]
    print_table("targets", ["ratio", "measured", "target", ""], rows)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_header(script: str, info: dict) -> None:
    print(
        f"{script} | {info['device_name']} | {info['dtype']} | preset {info['preset']} "
        f"| threads {info['threads']} | batch {info['batch_size']} "
        f"| cpu load {info['cpu_load_1min_at_start']:.1f} (1 min avg)"
    )
    for change in info["preset_changes"]:
        print(f"  preset: {change}")


def write_json(path: Path, payload: dict) -> None:
    """Write `payload`, plus the machine's load average at the end of the run."""
    payload["cpu_load_1min_at_end"] = os.getloadavg()[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {path}")
