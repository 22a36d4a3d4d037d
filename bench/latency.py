"""`predict_action_chunk` wall time: ours with and without the prefix KV cache, and LeRobot's pi0.

All three run in one process on the same inputs (same images, token ids, state and noise), with the
same thread count, timed round-robin after warm-up. `--profile` adds a torch.profiler table of one
cached call of ours (top ops by self time).

    python bench/latency.py                                   # CPU, small preset
    python bench/latency.py --device cuda --dtype bfloat16    # GPU, full preset
"""

from __future__ import annotations

import torch
from common import (
    BUILDERS,
    PRESETS,
    check_target,
    describe,
    make_batch,
    make_noise,
    parse_args,
    predictor,
    print_comparison,
    print_header,
    print_table,
    print_targets,
    run_info,
    setup,
    summarize,
    time_interleaved,
    write_json,
)


def add_arguments(parser) -> None:
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every variant")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds of every variant")
    parser.add_argument("--profile", action="store_true", help="also profile one cached call of ours")
    parser.add_argument("--profile-rows", type=int, default=20)


def profile(call, device: torch.device, rows: int) -> dict:
    """Top ops of one call by self time (CPU, or CUDA kernels on a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        call()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows)
    print(f"\ntorch.profiler: one cached predict_action_chunk of ours, top {rows} ops by {sort_by}")
    print(table)
    return {"sort_by": sort_by, "table": table}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "latency", add_arguments)
    device = setup(args)
    geometry = PRESETS[args.preset]
    info = run_info(args)
    print_header("latency", info)

    policies = {name: build(geometry, device, args.dtype, args.seed) for name, build in BUILDERS.items()}
    descriptions = {name: describe(policy, name) for name, policy in policies.items()}
    print_comparison(descriptions)

    batch = make_batch(geometry, args.batch_size, device, args.seed)
    noise = make_noise(geometry, args.batch_size, device, args.seed)
    ours = policies["ours"]
    calls = {
        "ours use_cache=true": predictor(ours, batch, noise, use_cache=True),
        "ours use_cache=false": predictor(ours, batch, noise, use_cache=False),
        "pi0": predictor(policies["pi0"], batch, noise),
    }
    with torch.inference_mode():
        times = time_interleaved(calls, args.warmup, args.reps, device)
    results = {name: summarize(samples) for name, samples in times.items()}

    cached, uncached, pi0 = (results[name]["median"] for name in calls)
    targets = {
        "nocache_over_cache_latency": check_target("nocache_over_cache_latency", uncached / cached),
        "ours_over_pi0_latency": check_target("ours_over_pi0_latency", cached / pi0),
    }
    rows = [[name, r["median"], r["p10"], r["p90"], r["n"]] for name, r in results.items()]
    print_table(
        f"predict_action_chunk seconds (batch {args.batch_size}, {geometry.cameras} cameras, "
        f"{geometry.prompt_length} prompt tokens, chunk {geometry.chunk_size}, "
        f"{geometry.num_steps} Euler steps)",
        ["variant", "median", "p10", "p90", "n"],
        rows,
    )
    print_targets(targets)

    payload = {
        "script": "latency",
        "info": info,
        "models": descriptions,
        "results": results,
        "targets": targets,
    }
    if args.profile:
        with torch.inference_mode():
            payload["profile"] = profile(calls["ours use_cache=true"], device, args.profile_rows)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
