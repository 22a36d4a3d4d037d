"""Analytic FLOPs of one `predict_action_chunk` of ours / its measured time, as a fraction of the
machine's dense matmul throughput measured in the same run, in the same dtype.

FLOPs count the matrix products only (2 * m * n * k each); norms, activations, RoPE and softmax are
O(tokens * width) and left out. Per sample (times the batch size), with
    C cameras, P = (image_size / patch)^2 patches per image, Lt prompt tokens, Lp = C * P + Lt,
    Ls = [state] + H actions + [time] suffix tokens, N decoder layers, S Euler steps,
    lin(n, a, b) = 2 n a b,   attn(nq, nk) = 4 nq nk heads head_dim   (Q K^T and weights @ V),
    layer(n, nk) = lin(n, W, heads hd) * 2 + lin(n, W, kv_heads hd) * 2 + attn(n, nk) + 3 lin(n, W, mlp)
                   (q and o, k and v, attention, gated MLP), on the stream's own W / mlp,
  vision    = C [lin(P, 3 patch^2, Wv) + Nv (4 lin(P, Wv, Wv) + 4 P^2 Wv + 2 lin(P, Wv, mlp_v))]
  projector = C [lin(P, Wv, W) + lin(P, W, W)]                               (LLaVA's 2-layer MLP)
  heads     = lin(1, state, We) + lin(H, action, We) + 2 lin(1, We, We) + lin(H, We, action)
  cached    = vision + projector
              + (N - 1) layer_llm(Lp, Lp) + 2 lin(Lp, W, kv_heads hd)        (prefix; last layer: K/V only)
              + S [N layer_expert(Ls, Lp + Ls) + heads]                       (one Euler step each)
  no cache  = vision + projector + S [joint step], where a joint step runs, as executed by one SDPA
              call per layer over the whole sequence (masked keys are computed too):
              (N - 1) [layer_llm(Lp, Lp + Ls) + layer_expert(Ls, Lp + Ls)]   (joint attention split by rows)
              + last layer: q, k, v of the prefix + layer_expert(Ls, Lp + Ls)
              + heads
The fixed part (vision + projector + prefix) and the per-step part are also timed apart, from the
difference between S steps and 1 step.

    python bench/roofline.py                                   # CPU, small preset
    python bench/roofline.py --device cuda --dtype bfloat16    # GPU, full preset
"""

from __future__ import annotations

import torch
from common import (
    PRESETS,
    MatchedSizes,
    build_ours,
    check_target,
    describe,
    make_batch,
    make_noise,
    parse_args,
    predictor,
    print_header,
    print_table,
    print_targets,
    run_info,
    setup,
    summarize,
    time_interleaved,
    write_json,
)

from lerobot_llava3d_fusion.model.network import TORCH_DTYPES as DTYPES  # noqa: E402


def add_arguments(parser) -> None:
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="side of the reference's square matmuls (default: 2048 on cpu, 8192 on cuda)",
    )


# ------------------------------------------------------------------------------------------ FLOPs


def lin(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def attention(n_queries: int, n_keys: int, dims: dict) -> int:
    return 4 * n_queries * n_keys * dims["num_heads"] * dims["head_dim"]


def qkvo(n: int, dims: dict) -> int:
    width, hd = dims["width"], dims["head_dim"]
    return 2 * lin(n, width, dims["num_heads"] * hd) + 2 * lin(n, width, dims["num_kv_heads"] * hd)


def kv_only(n: int, dims: dict) -> int:
    return 2 * lin(n, dims["width"], dims["num_kv_heads"] * dims["head_dim"])


def q_only(n: int, dims: dict) -> int:
    return lin(n, dims["width"], dims["num_heads"] * dims["head_dim"])


def mlp(n: int, dims: dict) -> int:
    return 3 * lin(n, dims["width"], dims["mlp_dim"])


def layer(n: int, n_keys: int, dims: dict) -> int:
    return qkvo(n, dims) + attention(n, n_keys, dims) + mlp(n, dims)


def sampling_flops(
    sizes: MatchedSizes, model: dict, suffix_length: int, num_steps: int, batch_size: int
) -> dict:
    """Per-part FLOPs (see the module docstring) of one predict_action_chunk call, cached and not."""
    vision, llm, expert = model["vision"], model["llm"], model["expert"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    prefix_len = sizes.cameras * patches + sizes.prompt_length
    total_len = prefix_len + suffix_length
    horizon, depth = sizes.chunk_size, llm["depth"]
    wv, w, we = vision["width"], llm["width"], expert["width"]

    vision_layer = 4 * lin(patches, wv, wv) + 4 * patches**2 * wv + 2 * lin(patches, wv, vision["mlp_dim"])
    patch_embedding = lin(patches, 3 * vision["patch_size"] ** 2, wv)
    parts = {
        "vision": sizes.cameras * (patch_embedding + vision["depth"] * vision_layer),
        "projector": sizes.cameras * (lin(patches, wv, w) + lin(patches, w, w)),
        "llm prefix (cache)": (depth - 1) * layer(prefix_len, prefix_len, llm) + kv_only(prefix_len, llm),
    }
    state, action = sizes.max_state_dim, sizes.max_action_dim
    heads = lin(1, state, we) + lin(horizon, action, we) + 2 * lin(1, we, we) + lin(horizon, we, action)
    parts["expert step (cache)"] = depth * layer(suffix_length, total_len, expert) + heads
    parts["joint step (no cache)"] = (
        (depth - 1) * (layer(prefix_len, total_len, llm) + layer(suffix_length, total_len, expert))
        + q_only(prefix_len, llm)
        + kv_only(prefix_len, llm)
        + layer(suffix_length, total_len, expert)
        + heads
    )
    parts = {name: batch_size * flops for name, flops in parts.items()}
    fixed_cache = parts["vision"] + parts["projector"] + parts["llm prefix (cache)"]
    fixed_nocache = parts["vision"] + parts["projector"]
    return {
        "parts": parts,
        "prefix_tokens": prefix_len,
        "suffix_tokens": suffix_length,
        "fixed_cache": fixed_cache,
        "fixed_nocache": fixed_nocache,
        "cached": fixed_cache + num_steps * parts["expert step (cache)"],
        "nocache": fixed_nocache + num_steps * parts["joint step (no cache)"],
    }


# --------------------------------------------------------------------------------------- measured


def matmul_reference(size: int, dtype: torch.dtype, device: torch.device):
    """A call doing `count` products of two random (size, size) matrices, and its FLOPs."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    count = 1 if device.type == "cpu" else 20  # a GPU product of 8192^3 takes ~1 ms: time several

    def call() -> None:
        for _ in range(count):
            torch.matmul(a, b)

    return call, count * 2 * size**3


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "roofline", add_arguments)
    device = setup(args)
    sizes = PRESETS[args.preset]
    info = run_info(args)
    print_header("roofline", info)

    policy = build_ours(sizes, device, args.dtype, args.seed)
    model = describe(policy, "ours")
    steps = sizes.num_steps
    # [state] [H actions] [time]
    suffix_length = int(policy.config.use_state_token) + policy.config.chunk_size + 1
    flops = sampling_flops(sizes, model, suffix_length, steps, args.batch_size)

    batch = make_batch(sizes, args.batch_size, device, args.seed)
    noise = make_noise(sizes, args.batch_size, device, args.seed)
    matmul_size = args.matmul_size or (2048 if device.type == "cpu" else 8192)
    matmul_call, matmul_flops = matmul_reference(matmul_size, DTYPES[args.dtype], device)
    calls = {
        "matmul": matmul_call,
        f"cache {steps} steps": predictor(policy, batch, noise, use_cache=True, num_steps=steps),
        "cache 1 step": predictor(policy, batch, noise, use_cache=True, num_steps=1),
        f"no cache {steps} steps": predictor(policy, batch, noise, use_cache=False, num_steps=steps),
        "no cache 1 step": predictor(policy, batch, noise, use_cache=False, num_steps=1),
    }
    with torch.inference_mode():
        times = time_interleaved(calls, args.warmup, args.reps, device)
    results = {name: summarize(samples) for name, samples in times.items()}
    seconds = {name: result["median"] for name, result in results.items()}
    peak = matmul_flops / seconds["matmul"]

    # (name, FLOPs, seconds); the per-step and fixed parts come from S-step minus 1-step timings.
    step_cache = (seconds[f"cache {steps} steps"] - seconds["cache 1 step"]) / (steps - 1)
    step_nocache = (seconds[f"no cache {steps} steps"] - seconds["no cache 1 step"]) / (steps - 1)
    parts = flops["parts"]
    measured = [
        (f"cache: whole call ({steps} steps)", flops["cached"], seconds[f"cache {steps} steps"]),
        (
            "cache: vision + projector + LLM prefix",
            flops["fixed_cache"],
            seconds["cache 1 step"] - step_cache,
        ),
        ("cache: one Euler step (expert)", parts["expert step (cache)"], step_cache),
        (f"no cache: whole call ({steps} steps)", flops["nocache"], seconds[f"no cache {steps} steps"]),
        ("no cache: vision + projector", flops["fixed_nocache"], seconds["no cache 1 step"] - step_nocache),
        ("no cache: one Euler step (joint)", parts["joint step (no cache)"], step_nocache),
    ]
    rows = [[f"matmul {matmul_size}^3 reference", matmul_flops / 1e9, seconds["matmul"], peak / 1e9, 1.0]]
    rows += [[name, f / 1e9, s, f / s / 1e9, f / s / peak] for name, f, s in measured]
    print_table(
        f"FLOP rate (batch {args.batch_size}, {flops['prefix_tokens']} prefix + "
        f"{flops['suffix_tokens']} suffix tokens, {args.dtype})",
        ["", "GFLOP", "seconds", "GFLOP/s", "of matmul"],
        rows,
    )
    print_table("analytic GFLOP per part", ["part", "GFLOP"], [[name, f / 1e9] for name, f in parts.items()])

    fraction = flops["cached"] / seconds[f"cache {steps} steps"] / peak
    targets = {"sampling_fraction_of_matmul_peak": check_target("sampling_fraction_of_matmul_peak", fraction)}
    print_targets(targets)
    write_json(
        args.out,
        {
            "script": "roofline",
            "info": info,
            "model": model,
            "flops": flops,
            "matmul": {"size": matmul_size, "flops": matmul_flops, "flops_per_s": peak},
            "results": results,
            "rates": {
                name: {"flops": f, "seconds": s, "flops_per_s": f / s, "fraction_of_matmul": f / s / peak}
                for name, f, s in measured
            },
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
