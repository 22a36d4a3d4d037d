"""`predict_action_chunk` wall time: ours with and without the prefix KV cache, and LeRobot's pi0.

All three run in one process on the same inputs (same images, token ids, state and noise), with the
same thread count, timed round-robin after warm-up. `--profile` adds a torch.profiler table of one
cached call of ours (top ops by self time). `--compile-modes reduce-overhead` adds ours with the
cached Euler step compiled by torch.compile in that mode (what `--policy.compile_model=true
--policy.compile_mode=...` does; on a GPU "reduce-overhead" replays the step as a CUDA graph), the
same weights, compiled during the warm-up rounds.

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
    pi0_unavailable,
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
    parser.add_argument(
        "--compile-modes",
        nargs="*",
        default=[],
        help="torch.compile modes of the cached denoising step to time as well (e.g. reduce-overhead)",
    )


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


def with_denoise_step(policy, step, call):
    """`call` with `step` as the policy's cached denoising step (eager or compiled)."""

    def wrapped() -> torch.Tensor:
        policy.model.denoise_step = step
        return call()

    return wrapped


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "latency", add_arguments)
    device = setup(args)
    sizes = PRESETS[args.preset]
    info = run_info(args)
    print_header("latency", info)

    skip_pi0 = pi0_unavailable()
    if skip_pi0:
        print(f"\npi0 left out: {skip_pi0}.")
    builders = {name: build for name, build in BUILDERS.items() if not (name == "pi0" and skip_pi0)}
    policies = {name: build(sizes, device, args.dtype, args.seed) for name, build in builders.items()}
    descriptions = {name: describe(policy, name) for name, policy in policies.items()}
    if "pi0" in descriptions:
        print_comparison(descriptions)

    batch = make_batch(sizes, args.batch_size, device, args.seed)
    noise = make_noise(sizes, args.batch_size, device, args.seed)
    ours = policies["ours"]
    calls = {
        "ours use_cache=true": predictor(ours, batch, noise, use_cache=True),
        "ours use_cache=false": predictor(ours, batch, noise, use_cache=False),
    }
    if "pi0" in policies:
        calls["pi0"] = predictor(policies["pi0"], batch, noise)
    cached_call, eager_step = calls["ours use_cache=true"], ours.model.denoise_step
    if args.compile_modes:
        calls["ours use_cache=true"] = with_denoise_step(ours, eager_step, cached_call)
    for mode in args.compile_modes:
        compiled_step = torch.compile(ours.model.fusion.forward_suffix, mode=mode)
        calls[f"ours compile_mode={mode}"] = with_denoise_step(ours, compiled_step, cached_call)
    with torch.inference_mode():
        times = time_interleaved(calls, args.warmup, args.reps, device)
    results = {name: summarize(samples) for name, samples in times.items()}

    cached, uncached = (results[name]["median"] for name in ("ours use_cache=true", "ours use_cache=false"))
    pi0 = results["pi0"]["median"] if "pi0" in results else float("nan")
    targets = {"nocache_over_cache_latency": check_target("nocache_over_cache_latency", uncached / cached)}
    if "pi0" in results:
        targets["ours_over_pi0_latency"] = check_target("ours_over_pi0_latency", cached / pi0)
    rows = [[name, r["median"], r["p10"], r["p90"], r["n"]] for name, r in results.items()]
    print_table(
        f"predict_action_chunk seconds (batch {args.batch_size}, {sizes.cameras} cameras, "
        f"{sizes.prompt_length} prompt tokens, chunk {sizes.chunk_size}, "
        f"{sizes.num_steps} Euler steps)",
        ["variant", "median", "p10", "p90", "n"],
        rows,
    )
    print_targets(targets)
    compiled_ratios = {
        mode: {
            "over_eager": results[f"ours compile_mode={mode}"]["median"] / cached,
            "over_pi0": results[f"ours compile_mode={mode}"]["median"] / pi0,
        }
        for mode in args.compile_modes
    }
    if compiled_ratios:
        print_table(
            "compiled cached denoising step",
            ["compile_mode", "median s", "/ ours eager", "/ pi0"],
            [
                [mode, results[f"ours compile_mode={mode}"]["median"], r["over_eager"], r["over_pi0"]]
                for mode, r in compiled_ratios.items()
            ],
        )

    payload = {
        "script": "latency",
        "info": info,
        "models": descriptions,
        "results": results,
        "targets": targets,
        "compiled": compiled_ratios,
    }
    if args.profile:
        with torch.inference_mode():
            payload["profile"] = profile(calls["ours use_cache=true"], device, args.profile_rows)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
