"""Prefix tokens and `predict_action_chunk` latency with and without voxel pooling (2 RGB-D cameras).

One policy (`geometry=depth`, `geometry_encoder=llava3d_mlp`, random weights, the preset's sizes) sees a
synthetic tabletop from two overlapping cameras looking down; the same call is timed with
`geometry_voxel_size` off and at each `--voxel-sizes` value, round-robin in one run. Latencies are reported
as ratios to the unpooled call.

    python bench/voxel_pooling.py --threads 1                  # CPU, small preset
    python bench/voxel_pooling.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import torch
from common import (
    PRESETS,
    MatchedSizes,
    build_ours,
    make_batch,
    make_noise,
    parse_args,
    predictor,
    print_header,
    print_table,
    run_info,
    setup,
    summarize,
    time_interleaved,
    write_json,
)
from lerobot.configs import FeatureType, PolicyFeature

from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy
from lerobot_llava3d_fusion.observation_keys import depth_key, extrinsics_key, intrinsics_key

CAMERA_HEIGHT = 0.8  # metres above the table, looking straight down
CAMERA_OFFSETS = (0.0, 0.15)  # x of each camera: their views overlap by most of their width
# (x, y, half size, height) of blocks on the table, metres.
BLOCKS = ((0.05, 0.0, 0.04, 0.08), (-0.15, 0.1, 0.05, 0.05), (0.2, -0.12, 0.03, 0.12))


def add_arguments(parser) -> None:
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every variant")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds of every variant")
    parser.add_argument(
        "--voxel-sizes",
        type=float,
        nargs="+",
        default=[0.02, 0.05, 0.2],
        help="geometry_voxel_size values, metres (0.2: LLaVA-3D's)",
    )


def intrinsics(size: int) -> torch.Tensor:
    """A pinhole camera of ~58 degrees field of view on a `size` x `size` depth grid."""
    focal, centre = 200.0 * size / 224, (size - 1) / 2
    return torch.tensor([[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]])


def camera_to_world(x: float) -> torch.Tensor:
    """Camera at (x, 0, CAMERA_HEIGHT) looking down: camera z -> world -z, camera y (image down) -> world -y."""
    pose = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    pose[:3, 3] = torch.tensor([x, 0.0, CAMERA_HEIGHT])
    return pose


def tabletop_depth(size: int, camera_x: float) -> torch.Tensor:
    """(1, size, size) metric depth of the table and the tops of BLOCKS seen from camera_to_world(camera_x)."""
    matrix = intrinsics(size)
    pixels = torch.arange(size, dtype=torch.float)
    ray_x = ((pixels - matrix[0, 2]) / matrix[0, 0])[None, :]  # (1, W): x / z in the camera frame
    ray_y = ((pixels - matrix[1, 2]) / matrix[1, 1])[:, None]  # (H, 1)
    depth = torch.full((size, size), CAMERA_HEIGHT)
    for block_x, block_y, half, height in BLOCKS:
        z = CAMERA_HEIGHT - height  # depth of the block's top
        world_x, world_y = camera_x + ray_x * z, -ray_y * z
        inside = ((world_x - block_x).abs() <= half) & ((world_y - block_y).abs() <= half)
        depth = torch.where(inside, torch.minimum(depth, torch.tensor(z)), depth)
    return depth[None]


def build_policy(sizes: MatchedSizes, device: torch.device, dtype: str, seed: int) -> Llava3DFusionPolicy:
    """Ours with depth for every camera and LLaVA-3D's position encoder (voxel size set per call)."""
    size = sizes.vision.image_size
    depth = {depth_key(key): PolicyFeature(FeatureType.STATE, (1, size, size)) for key in sizes.camera_keys}
    return build_ours(
        sizes,
        device,
        dtype,
        seed,
        freeze_vision_encoder=True,
        extra_inputs=depth,
        config_fields={"geometry": "depth", "geometry_encoder": "llava3d_mlp", "geometry_gate_init": 1.0},
    )


def add_depth(batch: dict, sizes: MatchedSizes, device: torch.device) -> dict:
    size, batch_size = sizes.vision.image_size, batch["observation.state"].shape[0]
    for key, camera_x in zip(sizes.camera_keys, CAMERA_OFFSETS, strict=True):
        batch[depth_key(key)] = tabletop_depth(size, camera_x).expand(batch_size, 1, size, size)
        batch[intrinsics_key(key)] = intrinsics(size).expand(batch_size, 3, 3)
        batch[extrinsics_key(key)] = camera_to_world(camera_x).expand(batch_size, 4, 4)
    return {key: value.to(device) for key, value in batch.items()}


def prefix_tokens(policy: Llava3DFusionPolicy, batch: dict, voxel_size: float | None) -> dict:
    """Image tokens per sample (valid ones) and the padded prefix length at `voxel_size`."""
    policy.config.geometry_voxel_size = voxel_size
    inputs = policy._prepare_inputs(batch)
    with torch.inference_mode():
        _, mask, _ = policy.model.embed_prefix(
            inputs.images, inputs.camera_geometry, inputs.lang_tokens, inputs.lang_mask
        )
    image_mask = mask[:, : mask.shape[1] - inputs.lang_tokens.shape[1]]
    return {"image_tokens": image_mask.sum(dim=1).tolist(), "prefix_length": mask.shape[1]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "voxel_pooling", add_arguments)
    if len(CAMERA_OFFSETS) != PRESETS[args.preset].cameras:
        raise ValueError(
            f"the scene has {len(CAMERA_OFFSETS)} cameras, the preset {PRESETS[args.preset].cameras}"
        )
    device = setup(args)
    sizes = PRESETS[args.preset]
    info = run_info(args)
    info["scene"] = {"camera_height_m": CAMERA_HEIGHT, "camera_x_m": CAMERA_OFFSETS, "blocks": BLOCKS}
    print_header("voxel_pooling", info)

    policy = build_policy(sizes, device, args.dtype, args.seed)
    batch = add_depth(make_batch(sizes, args.batch_size, device, args.seed), sizes, device)
    noise = make_noise(sizes, args.batch_size, device, args.seed)
    variants = {"no voxel pooling": None} | {f"voxel {size:g} m": size for size in args.voxel_sizes}
    tokens = {name: prefix_tokens(policy, batch, size) for name, size in variants.items()}
    calls = {
        name: predictor(policy, batch, noise, geometry_voxel_size=size) for name, size in variants.items()
    }
    with torch.inference_mode():
        times = time_interleaved(calls, args.warmup, args.reps, device)
    results = {name: summarize(samples) | tokens[name] for name, samples in times.items()}
    baseline = results["no voxel pooling"]["median"]
    for result in results.values():
        result["latency_over_no_pooling"] = result["median"] / baseline

    rows = [
        [
            name,
            "/".join(str(n) for n in r["image_tokens"]),
            r["prefix_length"],
            r["median"],
            r["latency_over_no_pooling"],
            r["n"],
        ]
        for name, r in results.items()
    ]
    print_table(
        f"prefix tokens and predict_action_chunk seconds ({sizes.cameras} RGB-D cameras at "
        f"{sizes.vision.image_size} px, {sizes.vision.image_size // sizes.vision.patch_size}^2 "
        f"patches each, {sizes.prompt_length} prompt tokens, chunk {sizes.chunk_size}, "
        f"{sizes.num_steps} Euler steps, batch {args.batch_size})",
        ["variant", "image tokens", "prefix length", "median s", "latency / no pooling", "n"],
        rows,
    )
    write_json(args.out, {"script": "voxel_pooling", "info": info, "results": results})


if __name__ == "__main__":
    main()
