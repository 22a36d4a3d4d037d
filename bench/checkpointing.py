"""Peak training memory and step time of ours with and without gradient checkpointing.

Same training step and memory accounting as throughput.py (one subprocess per variant, one after
the other; CPU: RSS high-water mark during training, GPU: torch.cuda.max_memory_allocated; net =
peak - the process's runtime before the build). `gradient_checkpointing=true` recomputes each fused
layer's activations in the backward pass instead of storing them.

On the CPU the processes run with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_):
every tensor buffer is then its own mapping, returned to the system when freed, so the RSS follows
the tensors alive. With glibc's default (a threshold that grows with freed buffers) freed
activations stay in the heap and the recomputation in the backward pass shows up as extra RSS.
"held after forward": what one training forward pass (separate process) leaves alive for the
backward pass, mostly the stored activations, the part checkpointing shrinks; the peak of a whole
step also holds gradients, optimizer state and backward temporaries.
The vision tower is frozen as in the policy's default config (`--train-vision-encoder` trains it,
as throughput.py does; its activations are not checkpointed).

    python bench/checkpointing.py                                 # CPU, small preset, batch 8
    python bench/checkpointing.py --device cuda --dtype bfloat16  # GPU, full preset
"""

from __future__ import annotations

import functools
import multiprocessing
import os

from common import (
    BUILDERS,
    PRESETS,
    build_ours,
    make_batch,
    parse_args,
    print_header,
    print_table,
    run_info,
    setup,
    write_json,
)
from throughput import _receive, _train_group, memory_gib, reset_peak_memory

CHECKPOINTED = "ours_gradient_checkpointing"
# Module level: the spawned training processes re-import this script and need the builder too.
BUILDERS[CHECKPOINTED] = functools.partial(build_ours, config_fields={"gradient_checkpointing": True})


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


def forward_memory_worker(name: str, args, conn) -> None:
    """Memory the training forward pass leaves alive for the backward pass (the activations, GiB),
    and the peak during that forward, both above the memory before it."""
    device = setup(args)
    sizes = PRESETS[args.preset]
    policy = BUILDERS[name](sizes, device, args.dtype, args.seed, args.freeze_vision_encoder)
    batch = make_batch(sizes, args.batch_size, device, args.seed)
    policy.train()
    before = memory_gib(device)["current"]
    reset_peak_memory(device)
    loss, _ = policy.forward(batch)
    memory = memory_gib(device)
    conn.send({"held_after_forward": memory["current"] - before, "peak_in_forward": memory["peak"] - before})
    del loss


def forward_memory(name: str, args) -> dict:
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    process = context.Process(target=forward_memory_worker, args=(name, args, child_conn), daemon=True)
    process.start()
    result = _receive(name, (process, conn))
    process.join()
    return result


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "checkpointing", add_arguments)
    setup(args)
    if args.device == "cpu":
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # read by the spawned workers
    info = {
        **run_info(args),
        "freeze_vision_encoder": args.freeze_vision_encoder,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    print_header("checkpointing", info)
    results = {}
    for name in ("ours", CHECKPOINTED):  # one process at a time
        results.update(_train_group([name], args))
        results[name]["forward_memory_gib"] = forward_memory(name, args)

    rows = [
        [
            name,
            r["samples_per_s"],
            r["step_seconds"]["median"],
            r["memory_gib"]["after_build"],
            r["memory_gib"]["peak_training"],
            r["memory_gib"]["peak_training_net"],
            r["forward_memory_gib"]["held_after_forward"],
        ]
        for name, r in results.items()
    ]
    memory_kind = "GPU max_memory_allocated" if args.device == "cuda" else "RSS high-water"
    print_table(
        f"training step, batch {args.batch_size}, {args.steps} timed steps; memory GiB ({memory_kind})",
        ["model", "samples/s", "step s median", "after build", "peak", "net peak", "held after forward"],
        rows,
    )
    plain, checkpointed = results["ours"], results[CHECKPOINTED]
    ratios = {
        "peak_memory_net": checkpointed["memory_gib"]["peak_training_net"]
        / plain["memory_gib"]["peak_training_net"],
        "peak_memory_above_build": (
            checkpointed["memory_gib"]["peak_training"] - checkpointed["memory_gib"]["after_build"]
        )
        / (plain["memory_gib"]["peak_training"] - plain["memory_gib"]["after_build"]),
        "held_after_forward": checkpointed["forward_memory_gib"]["held_after_forward"]
        / plain["forward_memory_gib"]["held_after_forward"],
        "step_time": checkpointed["step_seconds"]["median"] / plain["step_seconds"]["median"],
    }
    print_table(
        "gradient checkpointing / without",
        ["net peak memory", "peak above the built model", "held after forward", "step time"],
        [
            [
                ratios["peak_memory_net"],
                ratios["peak_memory_above_build"],
                ratios["held_after_forward"],
                ratios["step_time"],
            ]
        ],
    )
    write_json(args.out, {"script": "checkpointing", "info": info, "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
