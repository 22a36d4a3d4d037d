"""Serving through ``llava3d-fusion-policy-server`` on loopback: round-trip overhead and sustained chunks/s.

A ``geometry=depth`` policy (tiny backbone: the numbers are about the serving path, not the network)
with one RealSense-like camera: the robot sends RGB ``uint8`` and depth ``uint16`` millimetres at
``--camera-size`` (default 480 x 640), the policy reads 224 x 224 (the server resizes: RGB bilinear,
depth nearest). The server runs in its own process (``python -m lerobot_llava3d_fusion.tools.policy_server``
on 127.0.0.1, ``--inference_latency=0``); clients speak LeRobot's protocol with LeRobot's client pieces
(``RemotePolicyConfig``, ``TimedObservation``, ``send_bytes_in_chunks``, the gRPC stub), as
``robot_client`` does.

1. round trip: one client sends an observation (``must_go``) and asks for its chunk, ``--reps`` times;
   against the same observation through the same steps in this process without the server
   (``prepare_remote_observation`` -> preprocessor -> ``predict_action_chunk`` -> postprocessor), timed
   interleaved. Reported: both medians and their ratio.
2. sustained: ``--clients`` client processes each loop send + GetActions for ``--seconds``; chunks
   received per second, in total and per client. LeRobot's server serves one robot: all clients share
   its one-observation queue, so a client may be answered with another's chunk or nothing.

    python bench/serving.py                       # CPU, ~2 min
"""

import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import parse_args, print_header, print_table, run_info, summarize, write_json
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.utils.feature_utils import dataset_to_policy_features, hw_to_dataset_features

JOINTS = ("shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist.pos", "gripper.pos")
POLICY_SIZE = 224
TASK = "pick up the cube"


def add_arguments(parser) -> None:
    # One intra-op thread per process: the server and the clients share the cores, and OpenMP threads
    # that wait for a busy core slow a tiny network down tenfold.
    parser.set_defaults(threads=1)
    parser.add_argument("--camera-size", default="480x640", help="the robot camera's H x W (RGB and depth)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20, help="round trips (and direct calls) timed")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the sustained run")


def robot_features(height: int, width: int) -> dict[str, dict]:
    observation = {
        **{joint: float for joint in JOINTS},
        "front": (height, width, 3),
        "front_depth": (height, width, 1),
    }
    return hw_to_dataset_features(observation, "observation", use_video=False)


def robot_observation(height: int, width: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    observation = {joint: float(rng.normal()) for joint in JOINTS}
    observation["front"] = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    observation["front_depth"] = rng.integers(400, 1500, (height, width, 1)).astype(np.uint16)
    observation["task"] = TASK
    return observation


def write_checkpoint(directory: Path, height: int, width: int) -> None:
    from lerobot_llava3d_fusion import Llava3DFusionConfig, make_llava3d_fusion_pre_post_processors
    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy

    features = dataset_to_policy_features(robot_features(POLICY_SIZE, POLICY_SIZE))
    focal = 0.9 * POLICY_SIZE
    centre = (POLICY_SIZE - 1) / 2
    config = Llava3DFusionConfig(
        vlm_model_name="tiny", geometry="depth", device="cpu",
        camera_intrinsics={"front": [[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]]},
        input_features=features, output_features={"action": PolicyFeature(FeatureType.ACTION, (len(JOINTS),))},
    )  # fmt: skip
    policy = Llava3DFusionPolicy(config)
    policy.save_pretrained(directory)
    for processor in make_llava3d_fusion_pre_post_processors(config, dataset_stats=None):
        processor.save_pretrained(directory)


# ------------------------------------------------------------------------------------ client side


class Client:
    """LeRobot's protocol from the robot's side, as ``robot_client.RobotClient`` speaks it."""

    def __init__(self, address: str, checkpoint: Path, features: dict, chunk: int):
        import grpc
        from lerobot.async_inference.helpers import RemotePolicyConfig
        from lerobot.transport import services_pb2, services_pb2_grpc
        from lerobot.transport.utils import grpc_channel_options

        self.services = services_pb2
        self.channel = grpc.insecure_channel(address, grpc_channel_options())
        self.stub = services_pb2_grpc.AsyncInferenceStub(self.channel)
        self.stub.Ready(services_pb2.Empty(), timeout=60)
        specs = RemotePolicyConfig("llava3d_fusion", str(checkpoint), features, chunk, "cpu")
        self.stub.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(specs)), timeout=300)

    def send(self, observation: dict, timestep: int) -> None:
        from lerobot.async_inference.helpers import TimedObservation
        from lerobot.transport.utils import send_bytes_in_chunks

        timed = TimedObservation(time.time(), timestep, observation, must_go=True)
        chunks = send_bytes_in_chunks(pickle.dumps(timed), self.services.Observation, silent=True)
        self.stub.SendObservations(chunks, timeout=60)

    def actions(self) -> list | None:
        answer = self.stub.GetActions(self.services.Empty(), timeout=60)
        return pickle.loads(answer.data) if answer.data else None  # nosec: our own server's answer

    def round_trip(self, observation: dict, timestep: int) -> list | None:
        self.send(observation, timestep)
        return self.actions()


def sustained_client(
    index: int, address: str, checkpoint: Path, features: dict, chunk: int, args, barrier, queue
):
    height, width = map(int, args.camera_size.split("x"))
    client = Client(address, checkpoint, features, chunk)
    observation = robot_observation(height, width, seed=index)
    barrier.wait(timeout=600)  # every client connected and instructed before the clock starts
    chunks = empty = 0
    timestep = index * 10**7
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        timestep += chunk
        if client.round_trip(observation, timestep) is None:
            empty += 1
        else:
            chunks += 1
    queue.put({"client": index, "chunks": chunks, "empty_answers": empty, "seconds": args.seconds})


# ------------------------------------------------------------------------------------------- main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, workdir: Path, threads: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "lerobot_llava3d_fusion.tools.policy_server", f"--port={port}",
        "--inference_latency=0", "--obs_queue_timeout=5", "--noise_seed=0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    log = (workdir / "server.log").open("w")
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_server(address: str, timeout: float = 180) -> None:
    import grpc

    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=timeout)
    channel.close()


def direct_call(directory: Path, features: dict, observation: dict):
    """The server's steps in this process, without transport: a callable for one chunk."""
    from lerobot.policies import make_pre_post_processors

    from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy
    from lerobot_llava3d_fusion.tools.remote_observation import prepare_remote_observation

    policy = Llava3DFusionPolicy.from_pretrained(directory)
    preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path=str(directory))
    noise = torch.randn(
        1, policy.config.chunk_size, policy.config.max_action_dim, generator=torch.Generator().manual_seed(0)
    )

    def call() -> torch.Tensor:
        batch = preprocessor(prepare_remote_observation(observation, features, policy.config))
        chunk = policy.predict_action_chunk(batch, noise=noise)
        return torch.stack([postprocessor(chunk[:, i]) for i in range(chunk.shape[1])], dim=1)

    return call, policy.config.chunk_size


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "serving", add_arguments)
    torch.set_num_threads(args.threads)
    info = run_info(args)
    info["preset"] = "tiny backbone"
    info["preset_changes"] = [
        f"robot camera {args.camera_size} RGB + uint16 depth -> policy {POLICY_SIZE}x{POLICY_SIZE}"
    ]
    print_header("serving.py", info)
    height, width = map(int, args.camera_size.split("x"))
    features = robot_features(height, width)
    observation = robot_observation(height, width, seed=0)

    with tempfile.TemporaryDirectory(prefix="serving_bench_") as tmp:
        workdir = Path(tmp)
        checkpoint = workdir / "checkpoint"
        write_checkpoint(checkpoint, height, width)
        port = free_port()
        address = f"127.0.0.1:{port}"
        server = start_server(port, workdir, args.threads)
        try:
            wait_for_server(address)
            direct, chunk = direct_call(checkpoint, features, observation)
            client = Client(address, checkpoint, features, chunk)
            timesteps = iter(range(0, 10**9, chunk))
            calls = {"direct": direct, "server": lambda: client.round_trip(observation, next(timesteps))}
            for _ in range(args.warmup):
                for call in calls.values():
                    call()
            times = {name: [] for name in calls}
            for _ in range(args.reps):
                for name, call in calls.items():
                    start = time.perf_counter()
                    assert call() is not None, f"{name}: no chunk"
                    times[name].append(time.perf_counter() - start)
            client.channel.close()
            round_trip = {name: summarize(samples) for name, samples in times.items()}

            context = multiprocessing.get_context("spawn")
            queue, barrier = context.Queue(), context.Barrier(args.clients)
            workers = [
                context.Process(
                    target=sustained_client,
                    args=(i, address, checkpoint, features, chunk, args, barrier, queue),
                )
                for i in range(args.clients)
            ]
            for worker in workers:
                worker.start()
            results = sorted(
                (queue.get(timeout=args.seconds + 300) for _ in workers), key=lambda r: r["client"]
            )
            for worker in workers:
                worker.join(timeout=60)
        finally:
            server.terminate()
            server.wait(timeout=30)

    ratio = round_trip["server"]["median"] / round_trip["direct"]["median"]
    total = sum(r["chunks"] for r in results) / args.seconds
    print_table(
        "round trip (one client, must_go observation -> chunk), seconds",
        ["path", "median", "p10", "p90"],
        [[name, s["median"], s["p10"], s["p90"]] for name, s in round_trip.items()]
        + [
            ["server / direct", ratio, "", ""],
            [
                "overhead (ms)",
                1000 * (round_trip["server"]["median"] - round_trip["direct"]["median"]),
                "",
                "",
            ],
        ],
    )
    print_table(
        f"sustained, {args.clients} clients, {args.seconds:.0f} s",
        ["client", "chunks", "chunks/s", "empty answers"],
        [[r["client"], r["chunks"], r["chunks"] / r["seconds"], r["empty_answers"]] for r in results]
        + [["all", sum(r["chunks"] for r in results), total, sum(r["empty_answers"] for r in results)]],
    )
    write_json(
        args.out,
        {
            "info": info,
            "chunk_size": chunk,
            "round_trip_s": round_trip,
            "server_over_direct_round_trip": ratio,
            "round_trip_overhead_ms": 1000
            * (round_trip["server"]["median"] - round_trip["direct"]["median"]),
            "sustained": {"clients": results, "chunks_per_s_total": total, "seconds": args.seconds},
        },
    )


if __name__ == "__main__":
    main()
