"""Peak training memory and step time of ours with and without gradient checkpointing, and where the peak comes from.

One subprocess per variant, one after the other, each taking throughput.py's training step (forward,
backward, grad clip, the policy's AdamW preset, zero_grad). Memory is measured per phase of every
step, warmup included: on the CPU the RSS, its high-water mark reset through /proc/self/clear_refs
when a phase starts; on a GPU torch.cuda.memory_allocated, its maximum reset likewise. Every number
is above the process's memory before the build (the Python, torch and library runtime):

    step start           weights + AdamW state (+ the batch), what every step starts from
    held after forward   what the forward pass leaves alive for the backward pass: the stored
                         activations, the part `gradient_checkpointing=true` shrinks (it recomputes
                         each fused layer's activations in the backward pass instead)
    peak in forward / backward / clip + AdamW step + zero_grad
    step peak            the highest of those: the number the target compares

Next to them, the exact bytes of the tensors that checkpointing does not touch: weights, gradients,
AdamW state.

On the CPU the processes run with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_):
every tensor buffer is then its own mapping, returned to the system when freed, so the RSS follows
the tensors alive. With glibc's default (a threshold that grows with freed buffers) freed
activations stay in the heap and the recomputation in the backward pass shows up as extra RSS.
The vision tower is frozen as in the policy's default config (`--train-vision-encoder` trains it, as
throughput.py does; its activations are not checkpointed). `--train-expert-only` freezes the whole
VLM stream (the policy's `train_expert_only`); `--depth` overrides the preset's LLM and expert depth.

    python bench/checkpointing.py --threads 1                     # CPU, small preset, batch 8
    python bench/checkpointing.py --device cuda --dtype bfloat16  # GPU, full preset
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import time
from multiprocessing.connection import Connection

import torch
from common import (
    PRESETS,
    MatchedSizes,
    build_ours,
    check_target,
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
from throughput import _receive, memory_gib, reset_peak_memory

VARIANTS = {"ours": False, "ours_gradient_checkpointing": True}  # name: gradient_checkpointing
PHASES = ("forward", "backward", "optimizer")


def add_arguments(parser) -> None:
    parser.set_defaults(batch_size=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps (allocate AdamW state)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument(
        "--train-vision-encoder",
        dest="freeze_vision_encoder",
        action="store_false",
        help="train the vision tower too (default: frozen, the policy's default)",
    )
    parser.add_argument(
        "--train-expert-only",
        action="store_true",
        help="freeze the VLM stream, train the expert and the flow-matching head (the policy's train_expert_only)",
    )
    parser.add_argument(
        "--depth", type=int, default=None, help="number of LLM and expert layers (default: the preset's)"
    )


def bench_sizes(args) -> MatchedSizes:
    """The preset, with `--depth` layers in both decoder stacks when given."""
    sizes = PRESETS[args.preset]
    if args.depth is None:
        return sizes
    return dataclasses.replace(
        sizes,
        llm=dataclasses.replace(sizes.llm, depth=args.depth),
        expert=dataclasses.replace(sizes.expert, depth=args.depth),
    )


def tensor_gib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


# ------------------------------------------------------------------------------------- worker


def train_worker(name: str, args, conn: Connection) -> None:
    """Build ours (with or without checkpointing), train, send the memory of every phase of every step."""
    device = setup(args)
    sizes = bench_sizes(args)
    runtime = memory_gib(device)["current"]
    fields = {"gradient_checkpointing": VARIANTS[name], "train_expert_only": args.train_expert_only}
    policy = build_ours(
        sizes, device, args.dtype, args.seed, args.freeze_vision_encoder, config_fields=fields
    )
    preset = policy.config.get_optimizer_preset()
    params = [p for p in policy.get_optim_params() if p.requires_grad]
    optimizer = preset.build(params)
    batch = make_batch(sizes, args.batch_size, device, args.seed)
    synchronize(device)
    after_build = memory_gib(device)["current"] - runtime
    policy.train()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    print(f"  {name} built", flush=True)

    def run_phase(step: dict, phase: str, function) -> object:
        """Run one phase of a step; record its seconds, its peak and the memory at its end."""
        synchronize(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        step["seconds"][phase] = time.perf_counter() - start
        memory = memory_gib(device)
        step["peak"][phase] = memory["peak"] - runtime
        step["end"][phase] = memory["current"] - runtime
        return result

    def optimizer_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, preset.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps, gradients = [], 0.0
    for index in range(args.warmup + args.steps):
        step = {"start": memory_gib(device)["current"] - runtime, "seconds": {}, "peak": {}, "end": {}}
        with autocast:
            loss, _ = run_phase(step, "forward", lambda: policy.forward(batch))
        run_phase(step, "backward", loss.backward)
        gradients = tensor_gib(p.grad for p in params if p.grad is not None)
        run_phase(step, "optimizer", optimizer_step)
        step["loss"] = loss.item()
        steps.append(step)
        print(f"  {name}: step {index + 1}/{args.warmup + args.steps}", flush=True)

    unique_params = {p.data_ptr(): p for p in policy.parameters()}.values()
    optimizer_state = (value for state in optimizer.state.values() for value in state.values())
    conn.send(
        {
            "tensors_gib": {
                "weights": tensor_gib(unique_params),
                "trainable_weights": tensor_gib(params),
                "gradients": gradients,
                "adamw_state": tensor_gib(v for v in optimizer_state if torch.is_tensor(v)),
            },
            "memory_gib": {"runtime_before_build": runtime, "after_build": after_build},
            "steps": steps,
            "optimizer": type(optimizer).__name__ + (" (fused)" if optimizer.defaults.get("fused") else ""),
        }
    )


def train(name: str, args) -> dict:
    """One training process; its memory per phase over every step, its timed steps' durations."""
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    process = context.Process(target=train_worker, args=(name, args, child_conn), daemon=True)
    process.start()
    result = _receive(name, (process, conn))
    process.join()
    steps = result["steps"]
    peaks = {phase: max(step["peak"][phase] for step in steps) for phase in PHASES}
    last = steps[-1]
    result["memory_gib"].update(
        step_start=last["start"],
        held_after_forward=last["end"]["forward"] - last["start"],
        **{f"peak_in_{phase}": peak for phase, peak in peaks.items()},
        peak=max(peaks.values()),
    )
    result["peak_phase"] = max(peaks, key=peaks.get)
    timed = steps[args.warmup :]
    result["step_seconds"] = summarize([sum(step["seconds"].values()) for step in timed])
    result["samples_per_s"] = args.batch_size / result["step_seconds"]["median"]
    return result


# ------------------------------------------------------------------------------------- parent


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "checkpointing", add_arguments)
    setup(args)
    if args.device == "cpu":
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # read by the spawned workers
    sizes = bench_sizes(args)
    info = {
        **run_info(args),
        "sizes": dataclasses.asdict(sizes),
        "depth": sizes.llm.depth,
        "freeze_vision_encoder": args.freeze_vision_encoder,
        "train_expert_only": args.train_expert_only,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    print_header("checkpointing", info)
    if args.depth is not None:
        print(f"  --depth: llm.depth, expert.depth: {PRESETS[args.preset].llm.depth} -> {args.depth}")
    trained = (
        "expert and flow-matching head only (VLM frozen)" if args.train_expert_only else "VLM and expert"
    )
    vision = "frozen" if args.freeze_vision_encoder or args.train_expert_only else "trained"
    print(f"trains: {trained}; vision tower {vision}")

    results = {name: train(name, args) for name in VARIANTS}  # one process at a time

    print_table(
        "tensors, exact bytes (GiB)",
        ["model", "weights", "trainable weights", "gradients", "AdamW state"],
        [[name, *r["tensors_gib"].values()] for name, r in results.items()],
    )
    memory_kind = "GPU memory_allocated" if args.device == "cuda" else "RSS"
    print_table(
        f"training step, batch {args.batch_size}; memory GiB above the runtime ({memory_kind}), "
        f"peaks over {args.warmup} warmup + {args.steps} timed steps",
        [
            "model",
            "step start",
            "held after forward",
            "peak forward",
            "peak backward",
            "peak clip+AdamW",
            "step peak",
            "step s median",
        ],
        [
            [
                name,
                r["memory_gib"]["step_start"],
                r["memory_gib"]["held_after_forward"],
                r["memory_gib"]["peak_in_forward"],
                r["memory_gib"]["peak_in_backward"],
                r["memory_gib"]["peak_in_optimizer"],
                r["memory_gib"]["peak"],
                r["step_seconds"]["median"],
            ]
            for name, r in results.items()
        ],
    )
    plain, checkpointed = (results[name] for name in VARIANTS)

    def ratio(field: str) -> float:
        return checkpointed["memory_gib"][field] / plain["memory_gib"][field]

    ratios = {
        "step_peak": ratio("peak"),
        "step_peak_above_step_start": (
            checkpointed["memory_gib"]["peak"] - checkpointed["memory_gib"]["step_start"]
        )
        / (plain["memory_gib"]["peak"] - plain["memory_gib"]["step_start"]),
        "held_after_forward": ratio("held_after_forward"),
        "step_time": checkpointed["step_seconds"]["median"] / plain["step_seconds"]["median"],
    }
    print_table(
        "gradient checkpointing / without",
        ["step peak", "step peak above step start", "held after forward", "step time"],
        [list(ratios.values())],
    )
    targets = {
        "checkpointed_over_plain_peak_memory": check_target(
            "checkpointed_over_plain_peak_memory", ratios["step_peak"]
        )
    }
    print_targets(targets)
    write_json(
        args.out,
        {"script": "checkpointing", "info": info, "results": results, "ratios": ratios, "targets": targets},
    )


if __name__ == "__main__":
    main()
