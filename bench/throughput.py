"""Training throughput (forward + backward + grad clip + AdamW step) and peak memory, ours vs pi0.

Each policy lives in its own subprocess, so its peak memory is its own: on CPU the RSS high-water
mark of the process during training (reset after the build through /proc/self/clear_refs, so the
build's transient allocations do not count), on a GPU torch.cuda.max_memory_allocated during
training. The compared number is that peak minus the process's memory before the build (the
Python, torch and library runtime, the same in both processes).

By default both processes live at once and take training steps in turn (one steps while the other
waits), so the timings are interleaved as in latency.py; `--sequential` trains one policy after the
other instead, for a GPU that cannot hold both at once. The optimizer is each policy's own LeRobot
preset (AdamW for both; ours enables torch's fused kernel, pi0's runs torch's default, a per-tensor
loop on CPU) and the step is LeRobot's `update_policy` without the accelerator: backward,
clip_grad_norm_, step, zero_grad. With `--dtype bfloat16` the forward runs under bf16 autocast, as
`lerobot-train` runs it (Accelerate's autocast, switched on by `policy.dtype`); each policy keeps its
own bf16 storage (ours: float32 master weights for what trains, frozen parts in bf16; pi0: bf16
weights with float32 norms, vision tower and projector).

    python bench/throughput.py                                         # CPU, small preset, batch 2
    python bench/throughput.py --device cuda --dtype bfloat16 --batch-size 8 --sequential
"""

from __future__ import annotations

import contextlib
import multiprocessing
import re
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from common import (
    BUILDERS,
    MODELS,
    PRESETS,
    check_target,
    describe,
    make_batch,
    parse_args,
    print_header,
    print_table,
    print_targets,
    run_info,
    setup,
    summarize,
    synchronize,
    write_json,
)


def add_arguments(parser) -> None:
    parser.set_defaults(batch_size=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps (allocate AdamW state)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument(
        "--freeze-vision-encoder",
        action="store_true",
        help="freeze both vision towers (default: train everything, as pi0 does)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one policy's process after the other instead of both stepping in turns",
    )


# ------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def memory_gib(device: torch.device) -> dict:
    """Current and peak (since the last reset) memory of this process, GiB."""
    if device.type == "cuda":
        return {
            "current": torch.cuda.memory_allocated() / 2**30,
            "peak": torch.cuda.max_memory_allocated() / 2**30,
        }
    return {"current": _status_kib("VmRSS") / 2**20, "peak": _status_kib("VmHWM") / 2**20}


# ------------------------------------------------------------------------------------- worker


def train_worker(name: str, args, conn: Connection) -> None:
    """Build one policy; take a training step per "step" message; answer "done" with the results."""
    device = setup(args)
    sizes = PRESETS[args.preset]
    runtime_memory = memory_gib(device)["current"]
    policy = BUILDERS[name](sizes, device, args.dtype, args.seed, args.freeze_vision_encoder)
    preset = policy.config.get_optimizer_preset()
    params = [p for p in policy.get_optim_params() if p.requires_grad]
    optimizer = preset.build(params)
    batch = make_batch(sizes, args.batch_size, device, args.seed)
    synchronize(device)
    after_build = memory_gib(device)["current"]
    reset_peak_memory(device)
    policy.train()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    conn.send("ready")

    while conn.recv() == "step":
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss, _ = policy.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, preset.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        conn.send((time.perf_counter() - start, loss.item()))

    peak = memory_gib(device)["peak"]
    conn.send(
        {
            "memory_gib": {
                "runtime_before_build": runtime_memory,
                "after_build": after_build,
                "peak_training": peak,
                "peak_training_net": peak - runtime_memory,
            },
            "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else ""),
            "model": describe(policy, name),
        }
    )


# ------------------------------------------------------------------------------------- parent


def train_in_turns(args) -> dict[str, dict]:
    """One worker process per policy, stepped round-robin (all at once, or one by one with --sequential)."""
    groups = [[name] for name in MODELS] if args.sequential else [list(MODELS)]
    results = {}
    for group in groups:
        results.update(_train_group(group, args))
    return results


def _train_group(names: list[str], args) -> dict[str, dict]:
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name in names:
        conn, child_conn = context.Pipe()
        process = context.Process(target=train_worker, args=(name, args, child_conn), daemon=True)
        process.start()
        workers[name] = (process, conn)
    for name, worker in workers.items():
        _receive(name, worker)
        print(f"  {name} built", flush=True)

    step_times = {name: [] for name in workers}
    losses = {name: [] for name in workers}
    for step in range(args.warmup + args.steps):
        for name, worker in workers.items():
            worker[1].send("step")
            seconds, loss = _receive(name, worker)
            losses[name].append(loss)
            if step >= args.warmup:
                step_times[name].append(seconds)
        print(f"  step {step + 1}/{args.warmup + args.steps} ({', '.join(workers)})", flush=True)

    results = {}
    for name, worker in workers.items():
        worker[1].send("done")
        results[name] = _receive(name, worker)
        worker[0].join()
        seconds = summarize(step_times[name])
        results[name].update(
            step_seconds=seconds, samples_per_s=args.batch_size / seconds["median"], losses=losses[name]
        )
    return results


def _receive(name: str, worker):
    process, conn = worker
    try:
        return conn.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the {name} training process died (exit code {process.exitcode})") from None


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "throughput", add_arguments)
    setup(args)
    info = {
        **run_info(args),
        "freeze_vision_encoder": args.freeze_vision_encoder,
        "sequential": args.sequential,
    }
    print_header("throughput", info)
    print(
        f"vision encoder {'frozen' if args.freeze_vision_encoder else 'trained'} in both; "
        f"{'one policy after the other' if args.sequential else 'policies step in turns'}"
    )

    results = train_in_turns(args)
    memory_kind = "GPU max_memory_allocated" if args.device == "cuda" else "RSS high-water"
    rows = []
    for name, r in results.items():
        step, memory = r["step_seconds"], r["memory_gib"]
        rows.append(
            [
                name,
                r["samples_per_s"],
                step["median"],
                step["p10"],
                step["p90"],
                memory["runtime_before_build"],
                memory["after_build"],
                memory["peak_training"],
                memory["peak_training_net"],
                r["model"]["params_m"]["trainable"],
            ]
        )
    print_table(
        f"training step (forward + backward + clip + AdamW), {args.steps} timed steps; "
        f"memory GiB: {memory_kind}; net = peak - runtime",
        [
            "model",
            "samples/s",
            "step s median",
            "p10",
            "p90",
            "runtime",
            "after build",
            "peak",
            "net peak",
            "trainable M",
        ],
        rows,
    )
    ours, pi0 = results["ours"], results["pi0"]
    speed = ours["samples_per_s"] / pi0["samples_per_s"]
    memory = ours["memory_gib"]["peak_training_net"] / pi0["memory_gib"]["peak_training_net"]
    targets = {
        "ours_over_pi0_train_samples_per_s": check_target("ours_over_pi0_train_samples_per_s", speed),
        "ours_over_pi0_peak_memory": check_target("ours_over_pi0_peak_memory", memory),
    }
    print_targets(targets)
    write_json(args.out, {"script": "throughput", "info": info, "results": results, "targets": targets})


if __name__ == "__main__":
    main()
