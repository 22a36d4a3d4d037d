"""``llava3d-fusion-policy-server`` on loopback, driven by LeRobot's own ``RobotClient``.

A tiny ``geometry=depth`` checkpoint, a robot with a RealSense-like depth camera (``fake_depth_robot``),
the server on 127.0.0.1 in this process: action chunks equal what ``predict_action_chunk`` gives on
the same observation (as ``lerobot-rollout`` builds it) with the same noise; bad observations are
refused with a message the client receives, and the server keeps serving; malicious pickles are refused
without running their payload; LeRobot's control loop and action receiver run the robot on the server's
chunks. The test's own gRPC calls have a deadline; every test, with its fixtures, is bounded by a
watchdog (``WATCHDOG_S``), since LeRobot's client calls have none; fixtures stop what they start.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import faulthandler
import pickle
import socket
import sys
import threading

import grpc
import numpy as np
import pytest
import torch
from fake_depth_robot import (
    JOINTS,
    SIZE,
    TASK,
    FakeDepthRobotConfig,
    depth_robot_dataset_features,
    depth_robot_observation,
)
from helpers import fixed_noise
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies import make_pre_post_processors
from lerobot.policies.utils import build_inference_frame
from lerobot.utils.feature_utils import dataset_to_policy_features, hw_to_dataset_features

from lerobot_llava3d_fusion import Llava3DFusionConfig, make_llava3d_fusion_pre_post_processors
from lerobot_llava3d_fusion.modeling_llava3d_fusion import Llava3DFusionPolicy
from lerobot_llava3d_fusion.tools.remote_observation import resize_depth_nearest, resize_intrinsics
from lerobot_llava3d_fusion.tools.safe_unpickle import UnsafePickleError, safe_loads

K = [[30.0, 0.0, 15.5], [0.0, 30.0, 15.5], [0.0, 0.0, 1.0]]
CHUNK, MAX_ACTION_DIM, NOISE_SEED = 4, 8, 7
DEADLINE_S = 60
# The longest a test, with the fixtures it sets up and tears down, may take (the slowest takes about
# 40 s on a busy machine); past it the stacks of all threads are printed and the process exits.
WATCHDOG_S = 180


def terminal_stderr(config: pytest.Config) -> int:
    """The file descriptor of the terminal's stderr. pytest captures fd 2 into a file that is lost when
    the process exits, so a dump written there before exiting would never be seen; pytest's faulthandler
    plugin keeps a copy of the original one."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):  # another pytest, or -p no:faulthandler
        return sys.__stderr__.fileno()


def arm_watchdog(config: pytest.Config) -> None:
    """Print every thread's stack and exit the process (an xdist worker: reported as crashed) unless
    re-armed or cancelled within WATCHDOG_S."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True, file=terminal_stderr(config))


@pytest.fixture(scope="module", autouse=True)
def module_watchdog(pytestconfig):
    """Bounds the module-scoped fixtures set up before a test's own watchdog (RobotClient.start() waits on
    the server without a deadline); set up before them, torn down after them."""
    arm_watchdog(pytestconfig)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def watchdog(pytestconfig, module_watchdog):
    """WATCHDOG_S for each test, then again for the teardown that follows it (the module's fixtures after
    its last test)."""
    arm_watchdog(pytestconfig)
    yield
    arm_watchdog(pytestconfig)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny geometry=depth policy whose inputs are the fake robot's features, open geometry gate."""
    features = dataset_to_policy_features(depth_robot_dataset_features())
    torch.manual_seed(0)
    config = Llava3DFusionConfig(
        vlm_model_name="tiny", chunk_size=CHUNK, n_action_steps=CHUNK, num_steps=2, max_state_dim=8,
        max_action_dim=MAX_ACTION_DIM, device="cpu", geometry="depth", geometry_gate_init=1.0,
        camera_intrinsics={"front": K}, input_features=features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (len(JOINTS),))},
    )  # fmt: skip
    policy = Llava3DFusionPolicy(config)
    directory = tmp_path_factory.mktemp("depth_checkpoint")
    policy.save_pretrained(directory)
    preprocessor, postprocessor = make_llava3d_fusion_pre_post_processors(config, dataset_stats=None)
    preprocessor.save_pretrained(directory)
    postprocessor.save_pretrained(directory)
    return directory


@contextlib.contextmanager
def running_server(workdir, **config):
    """The server on 127.0.0.1 with seeded noise, stopped on exit (LeRobot's async-inference modules write
    logs/ into the working directory: ``workdir`` while it runs)."""
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        from lerobot_llava3d_fusion.tools.policy_server import Llava3DFusionServerConfig, start_server

        server_config = Llava3DFusionServerConfig(port=free_port(), noise_seed=NOISE_SEED, **config)
        grpc_server, policy_server = start_server(server_config)
        try:
            yield server_config, policy_server
        finally:
            policy_server.stop()
            grpc_server.stop(grace=None).wait(timeout=10)
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server_workdir"), obs_queue_timeout=10) as served:
        yield served


def make_client(checkpoint, port: int, calibration_dir):
    """LeRobot's unmodified RobotClient on the fake depth robot (connected, not started)."""
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.async_inference.robot_client import RobotClient

    robot = FakeDepthRobotConfig(calibration_dir=calibration_dir)
    return RobotClient(
        RobotClientConfig(
            policy_type="llava3d_fusion", pretrained_name_or_path=str(checkpoint), robot=robot,
            actions_per_chunk=CHUNK, task=TASK, server_address=f"127.0.0.1:{port}",
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server, checkpoint, tmp_path_factory):
    """LeRobot's unmodified RobotClient on the fake depth robot, connected and instructed."""
    config, _ = server
    client = make_client(checkpoint, config.port, tmp_path_factory.mktemp("calibration"))
    try:
        assert client.start()
        yield client
    finally:
        client.stop()


def send(client, raw: dict, timestep: int) -> None:
    """What RobotClient.send_observation sends, with a deadline; raises grpc.RpcError when refused."""
    from lerobot.async_inference.helpers import TimedObservation

    observation = TimedObservation(timestamp=0.0, timestep=timestep, observation=raw, must_go=True)
    send_raw_bytes(client, pickle.dumps(observation))


def send_raw_bytes(client, data: bytes) -> None:
    from lerobot.transport import services_pb2
    from lerobot.transport.utils import send_bytes_in_chunks

    chunks = send_bytes_in_chunks(data, services_pb2.Observation, silent=True)
    client.stub.SendObservations(chunks, timeout=DEADLINE_S)


def receive_chunk(client) -> torch.Tensor:
    """One GetActions answer as the client reads it: (actions_per_chunk, action_dim)."""
    from lerobot.transport import services_pb2

    answer = client.stub.GetActions(services_pb2.Empty(), timeout=DEADLINE_S)
    assert answer.data, "the server answered no chunk"
    timed_actions = pickle.loads(answer.data)  # the client's own step (trusts its server)
    return torch.stack([action.get_action() for action in timed_actions])


def expected_chunk(checkpoint, raw: dict) -> torch.Tensor:
    """The checkpoint's chunk on the frame lerobot-rollout builds from the same observation, same noise."""
    policy = Llava3DFusionPolicy.from_pretrained(checkpoint)
    preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path=str(checkpoint))
    frame = build_inference_frame(dict(raw), torch.device("cpu"), depth_robot_dataset_features(), task=TASK)
    noise = fixed_noise(policy, batch_size=1, seed=NOISE_SEED)
    return postprocessor(policy.predict_action_chunk(preprocessor(frame), noise=noise))[0]


def robot_observation(seed: int) -> dict:
    return {**depth_robot_observation(seed), "task": TASK}


def test_chunks_through_the_server_equal_predict_action_chunk_and_use_the_depth(client, checkpoint):
    raw = robot_observation(seed=0)
    send(client, raw, timestep=0)
    served = receive_chunk(client)
    assert served.shape == (CHUNK, len(JOINTS))
    torch.testing.assert_close(served, expected_chunk(checkpoint, raw), atol=1e-5, rtol=0)

    farther = robot_observation(seed=0)
    farther["front_depth"] = farther["front_depth"] * 2  # the depth reaches the geometry
    send(client, farther, timestep=10)
    assert (receive_chunk(client) - served).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda raw: raw.pop("front_depth"), "front_depth"),
        (lambda raw: raw.update(front_depth=np.zeros((SIZE, SIZE, 3), np.uint16)), "expected a depth map"),
        (lambda raw: raw.update(front=np.zeros((SIZE, SIZE), np.uint8)), "expected an RGB image"),
        (lambda raw: raw.pop(JOINTS[1]), JOINTS[1]),
    ],
    ids=["missing depth", "depth with 3 channels", "grey image", "missing joint"],
)
def test_a_bad_observation_is_refused_with_its_reason_and_the_server_keeps_serving(
    client, checkpoint, change, named
):
    raw = robot_observation(seed=1)
    change(raw)
    with pytest.raises(grpc.RpcError) as refused:
        send(client, raw, timestep=20)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in refused.value.details()
    # LeRobot's client logs the refusal and carries on (send_observation returns False).
    from lerobot.async_inference.helpers import TimedObservation

    assert not client.send_observation(TimedObservation(0.0, 21, raw, must_go=True))

    good = robot_observation(seed=2)
    send(client, good, timestep=30)
    torch.testing.assert_close(receive_chunk(client), expected_chunk(checkpoint, good), atol=1e-5, rtol=0)


@pytest.fixture
def loop_server(tmp_path_factory):
    """A server for one client's control loop. A stopped client leaves its last GetActions call waiting on
    the server's observation queue (up to obs_queue_timeout), where it would take another client's next
    observation: here it waits 1 s, on a server of its own."""
    with running_server(tmp_path_factory.mktemp("loop_server_workdir"), obs_queue_timeout=1) as served:
        yield served


def test_lerobots_control_loop_executes_the_servers_chunks_on_the_robot(loop_server, checkpoint, tmp_path):
    """LeRobot's client as ``python -m lerobot.async_inference.robot_client`` runs it: ``receive_actions``
    in one thread, ``control_loop`` in another, stopped by ``stop()`` once the robot has executed two
    chunks' worth of actions. The robot's observation (RGB, uint16 depth) never changes, so every chunk
    is the one ``predict_action_chunk`` gives on it with the server's noise."""
    config, policy_server = loop_server
    client = make_client(checkpoint, config.port, tmp_path)
    robot = client.robot
    receiver = threading.Thread(target=client.receive_actions, daemon=True)
    controller = threading.Thread(target=client.control_loop, kwargs={"task": TASK}, daemon=True)
    try:
        assert client.start()
        receiver.start()
        controller.start()
        executed_enough = robot.wait_for_actions(2 * CHUNK, timeout=DEADLINE_S)
    finally:
        client.stop()
    receiver.join(timeout=DEADLINE_S)
    controller.join(timeout=DEADLINE_S)
    assert not receiver.is_alive() and not controller.is_alive(), "the client's threads outlived stop()"
    assert executed_enough, f"the robot executed {len(robot.config.sent_actions)} actions in {DEADLINE_S} s"

    executed = torch.tensor([[action[joint] for joint in JOINTS] for action in robot.config.sent_actions])
    assert executed.shape[1] == len(JOINTS) and torch.isfinite(executed).all()
    expected = expected_chunk(checkpoint, robot_observation(seed=0))
    torch.testing.assert_close(executed[:CHUNK], expected, atol=1e-5, rtol=0)
    # Later chunks (asked for when the queue ran empty) are the same chunk again: each action is one of it.
    distance = (executed[:, None, :] - expected[None, :, :]).abs().amax(dim=-1).amin(dim=-1)
    assert distance.max() <= 1e-5, distance
    # What the server ran the policy on: the robot's observation, its depth still uint16 millimetres.
    received = policy_server.last_processed_obs.get_observation()
    sent = depth_robot_observation(seed=0)
    assert received["task"] == TASK and received["front_depth"].dtype == np.uint16
    for key in ("front", "front_depth", *JOINTS):
        np.testing.assert_array_equal(received[key], sent[key])


class WritesAFile:
    """A pickle whose loading runs a shell command (what `pickle.loads` would do with it)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_malicious_pickle_is_refused_without_running_its_payload(client, tmp_path):
    from lerobot.transport import services_pb2

    marker = tmp_path / "payload_ran"
    with pytest.raises(grpc.RpcError) as refused:
        send_raw_bytes(client, pickle.dumps(WritesAFile(marker)))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "system" in refused.value.details()
    with pytest.raises(grpc.RpcError):
        client.stub.SendPolicyInstructions(
            services_pb2.PolicySetup(data=pickle.dumps(WritesAFile(marker))), timeout=DEADLINE_S
        )
    assert not marker.exists()
    # The payload hidden inside a tensor's storage archive (torch.load's own unpickler) is refused too.
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(pickle.dumps(StorageArchive(marker)))
    assert not marker.exists()


class StorageArchive:
    """Pickles like a tensor storage: ``torch.storage._load_from_bytes(<torch.save archive>)``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import io

        buffer = io.BytesIO()
        torch.save(WritesAFile(self.path), buffer)
        return torch.storage._load_from_bytes, (buffer.getvalue(),)


def test_protocol_messages_round_trip_through_the_restricted_unpickler():
    from lerobot.async_inference.helpers import RemotePolicyConfig, TimedAction, TimedObservation

    observation = TimedObservation(
        1.5, 3, {**depth_robot_observation(), "task": TASK, "t": torch.arange(3.0)}
    )
    loaded = safe_loads(pickle.dumps(observation))
    assert loaded.timestep == 3 and loaded.observation["task"] == TASK
    np.testing.assert_array_equal(loaded.observation["front_depth"], observation.observation["front_depth"])
    torch.testing.assert_close(loaded.observation["t"], torch.arange(3.0))
    specs = RemotePolicyConfig("llava3d_fusion", "ckpt", depth_robot_dataset_features(), CHUNK)
    assert safe_loads(pickle.dumps(specs)) == specs
    actions = [TimedAction(0.0, 0, torch.ones(4))]
    assert safe_loads(pickle.dumps(actions))[0].action.equal(torch.ones(4))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        safe_loads(pickle.dumps(WritesAFile("/nonexistent/never")))


def test_depth_is_resized_by_nearest_neighbour_and_intrinsics_follow():
    depth = torch.randint(400, 1500, (1, 1, 8, 8), dtype=torch.int32).to(torch.uint16)
    doubled = depth.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # a 16 x 16 sensor, same view
    resized = resize_depth_nearest(doubled, (8, 8))
    assert resized.dtype == torch.uint16 and torch.equal(resized, depth)  # values picked, never blended
    k = torch.tensor(K)
    k_doubled = resize_intrinsics(k, (8, 8), (16, 16))
    torch.testing.assert_close(resize_intrinsics(k_doubled, (16, 16), (8, 8)), k)
    assert k_doubled[0, 0] == 60.0 and k_doubled[0, 2] == 31.5  # pixel centres: (15.5 + 0.5) * 2 - 0.5


def non_loopback_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_the_server_binds_loopback_unless_told(server):
    from lerobot_llava3d_fusion.tools.policy_server import Llava3DFusionServerConfig

    assert Llava3DFusionServerConfig().host == "127.0.0.1"
    config, _ = server
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    with socket.socket() as sock:  # the test server's port is closed on the machine's other address
        assert sock.connect_ex((address, config.port)) != 0


@pytest.mark.slow  # a fresh interpreter importing LeRobot: 10-40 s on a busy machine
def test_the_server_command_documents_its_flags_and_its_loopback_default(tmp_path):
    import subprocess
    import sys

    from e2e_utils import subprocess_env

    result = subprocess.run(
        [sys.executable, "-m", "lerobot_llava3d_fusion.tools.policy_server", "--help"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=subprocess_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--host" in result.stdout and "127.0.0.1" in result.stdout and "--noise_seed" in result.stdout


def test_a_larger_depth_camera_is_resized_to_the_policys_grid_with_its_intrinsics(checkpoint):
    """A sensor at twice the policy's resolution: nearest-neighbour depth (millimetres kept for the
    preprocessor), observation intrinsics rescaled to the resized grid, extrinsics passed through."""
    from lerobot.configs import PreTrainedConfig

    from lerobot_llava3d_fusion.tools.remote_observation import prepare_remote_observation

    config = PreTrainedConfig.from_pretrained(checkpoint)
    small = depth_robot_observation(seed=3)
    large = depth_robot_observation(seed=3, size=2 * SIZE)
    large["front_depth"] = small["front_depth"].repeat(2, axis=0).repeat(2, axis=1)
    k_large = resize_intrinsics(torch.tensor(K), (SIZE, SIZE), (2 * SIZE, 2 * SIZE))
    large["observation.intrinsics.front"] = k_large.numpy()
    large["observation.extrinsics.front"] = np.eye(4, dtype=np.float32)
    features = hw_to_dataset_features(
        {
            **{joint: float for joint in JOINTS},
            "front": (2 * SIZE, 2 * SIZE, 3),
            "front_depth": (2 * SIZE, 2 * SIZE, 1),
        },
        "observation",
        use_video=False,
    )
    observation = prepare_remote_observation({**large, "task": TASK}, features, config)
    depth = observation["observation.images.front_depth"]
    assert depth.dtype == torch.uint16 and depth.shape == (1, 1, SIZE, SIZE)
    assert torch.equal(depth[0, 0], torch.from_numpy(small["front_depth"][..., 0]))
    torch.testing.assert_close(observation["observation.intrinsics.front"][0], torch.tensor(K))
    assert observation["observation.extrinsics.front"].shape == (1, 4, 4)
    assert observation["observation.images.front"].shape == (1, 3, SIZE, SIZE)
