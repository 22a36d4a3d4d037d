"""Peak inference memory (weights, KV cache, activations of a chunk), ours vs LeRobot's pi0.

Each model lives in its own subprocess, one after the other, so its peak is its own: on CPU the RSS
high-water mark while predicting chunks (reset through /proc/self/clear_refs after a warm-up chunk, so
the build does not count), on a GPU torch.cuda.max_memory_allocated. The compared number is that peak
minus the process's memory before the build (the runtime, the same in every process).

Models, each in its own bf16 mode with `--dtype bfloat16` (the default here):
- ours: built to act (as lerobot-eval, lerobot-rollout and the policy server run it): every weight
  and the prefix KV cache in bf16;
- ours, loaded from a checkpoint: a training run's checkpoint (float32 master weights for what trains)
  saved on the CPU, then `from_pretrained` onto the device as LeRobot's scripts load it; its row also
  gives the peak of the load itself (on a GPU: whether a float32 copy ever reaches the device; on the
  CPU the policy is built there in float32 before its weights are read, so that peak is the build's);
- ours, float32 masters: the same policy after `train()` (how a training run evaluates): float32
  master weights for what trains, bf16 compute;
- pi0: LeRobot's PI0Policy in its bf16 mode (vision tower, projector and norms kept in float32).

    python bench/memory.py                         # CPU, small preset, bf16 (~2 min)
    python bench/memory.py --device cuda --preset full
"""

import gc
import multiprocessing
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from common import (
    BUILDERS,
    PRESETS,
    check_target,
    make_batch,
    make_noise,
    parse_args,
    predictor,
    print_header,
    print_table,
    print_targets,
    run_info,
    setup,
    synchronize,
    write_json,
)
from lerobot.configs import PreTrainedConfig
from throughput import memory_gib, reset_peak_memory

from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

LOADED = "ours (loaded from a checkpoint)"
VARIANTS = {"ours": "ours", LOADED: "ours", "ours (float32 masters)": "ours", "pi0": "pi0"}


def add_arguments(parser) -> None:
    parser.set_defaults(dtype="bfloat16")
    parser.add_argument("--chunks", type=int, default=2, help="chunks predicted after the warm-up one")


def weight_bytes(policy: torch.nn.Module) -> dict[str, float]:
    by_dtype: dict[str, float] = {}
    for tensor in (*policy.parameters(), *policy.buffers()):
        key = str(tensor.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0.0) + tensor.numel() * tensor.element_size() / 2**30
    return by_dtype


def load_from_checkpoint(sizes, device: torch.device, args) -> tuple[Llava3DFusionPolicy, float, float]:
    """Our policy as LeRobot's scripts load it: a training run's checkpoint, saved on the CPU, read by
    `from_pretrained` onto `device`; -> the policy, the memory (GiB) before the load and its peak."""
    with tempfile.TemporaryDirectory(prefix="llava_bench_checkpoint_") as directory:
        backbone, checkpoint = Path(directory) / "backbone", Path(directory) / "checkpoint"
        cpu = torch.device("cpu")
        trained = BUILDERS["ours"](sizes, cpu, args.dtype, args.seed, backbone_dir=backbone).train()
        trained.save_pretrained(checkpoint)
        del trained
        gc.collect()
        config = PreTrainedConfig.from_pretrained(checkpoint)
        config.device = device.type
        before = memory_gib(device)["current"]
        reset_peak_memory(device)
        policy = Llava3DFusionPolicy.from_pretrained(checkpoint, config=config)
        synchronize(device)
        return policy, before, memory_gib(device)["peak"]


def inference_worker(variant: str, args, conn: Connection) -> None:
    device = setup(args)
    sizes = PRESETS[args.preset]
    runtime = memory_gib(device)["current"]
    load_peak_net = None
    if variant == LOADED:
        policy, runtime, load_peak = load_from_checkpoint(sizes, device, args)
        load_peak_net = load_peak - runtime
    else:
        policy = BUILDERS[VARIANTS[variant]](sizes, device, args.dtype, args.seed)
    if variant == "ours (float32 masters)":
        policy.train()  # a training run's policy: its evaluation passes keep the float32 masters
    call = predictor(
        policy,
        make_batch(sizes, args.batch_size, device, args.seed),
        make_noise(sizes, args.batch_size, device, args.seed),
    )
    with torch.no_grad():
        call()  # warm-up: ours moves to its inference storage here
        gc.collect()
        synchronize(device)
        resident = memory_gib(device)["current"]
        reset_peak_memory(device)
        for _ in range(args.chunks):
            call()
        synchronize(device)
    peak = memory_gib(device)["peak"]
    conn.send(
        {
            "runtime_before_build_gib": runtime,
            "resident_after_first_chunk_gib": resident,
            "peak_gib": peak,
            "peak_net_gib": peak - runtime,
            "load_peak_net_gib": load_peak_net,
            "weights_gib_by_dtype": weight_bytes(policy),
        }
    )


def run(variant: str, args) -> dict:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=inference_worker, args=(variant, args, child))
    process.start()
    child.close()  # only the worker holds its end: its exit ends parent.recv()
    try:
        result = parent.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{variant}: the worker exited with code {process.exitcode} (its error is above)")
    process.join()
    return result


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "memory", add_arguments)
    setup(args)
    info = run_info(args)
    print_header("memory", info)
    results = {variant: run(variant, args) for variant in VARIANTS}
    kind = "GPU max_memory_allocated" if args.device == "cuda" else "RSS high-water"
    print_table(
        f"inference, batch {args.batch_size}, {args.chunks} chunks after a warm-up one; GiB ({kind}); net = peak - runtime",
        ["model", "weights+buffers by dtype", "resident", "peak", "net peak", "net load peak"],
        [
            [
                name,
                ", ".join(f"{dtype} {gib:.3f}" for dtype, gib in r["weights_gib_by_dtype"].items()),
                r["resident_after_first_chunk_gib"],
                r["peak_gib"],
                r["peak_net_gib"],
                "-" if r["load_peak_net_gib"] is None else r["load_peak_net_gib"],
            ]
            for name, r in results.items()
        ],
    )
    ratio = results["ours"]["peak_net_gib"] / results["pi0"]["peak_net_gib"]
    masters = results["ours (float32 masters)"]["peak_net_gib"] / results["ours"]["peak_net_gib"]
    loaded = results[LOADED]["peak_net_gib"] / results["ours"]["peak_net_gib"]
    print(f"\nours with float32 masters / ours built to act: {masters:.2f}x net peak")
    print(f"ours loaded from a checkpoint / ours built to act: {loaded:.2f}x net peak")
    targets = {
        "ours_over_pi0_inference_peak_memory": check_target("ours_over_pi0_inference_peak_memory", ratio)
    }
    print_targets(targets)
    write_json(
        args.out,
        {
            "script": "memory",
            "info": info,
            "results": results,
            "float32_masters_over_inference": masters,
            "loaded_over_built_inference": loaded,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
