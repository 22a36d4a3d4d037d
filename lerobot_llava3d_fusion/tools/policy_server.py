"""``llava3d-fusion-policy-server``: LeRobot's async-inference policy server for llava3d_fusion.

LeRobot's own ``robot_client`` (unmodified) drives a robot with it, exactly as with
``python -m lerobot.async_inference.policy_server``; on the server this one differs in:

- policy types: any registered one (third-party plugins are registered at start), not LeRobot's fixed
  ``SUPPORTED_POLICIES`` list, so ``--policy_type=llava3d_fusion`` is accepted;
- depth: a depth camera's ``<cam>_depth`` (``uint16`` millimetres or float metres) and optional camera
  matrices reach the policy's geometry (nearest-neighbour resize, metres), see ``remote_observation.py``;
- safety: it binds 127.0.0.1 unless ``--host`` says otherwise, and client messages are unpickled with a
  restricted unpickler (``safe_unpickle.py``) instead of ``pickle.loads``;
- errors: an observation the policy cannot take (missing depth, wrong shape, ...) is refused when it
  arrives with ``INVALID_ARGUMENT`` and a message naming the key, which the client logs; the server
  keeps serving;
- ``--noise_seed``: every chunk is sampled from the same seeded noise (reproducible actions).

    llava3d-fusion-policy-server --port=8080
    python -m lerobot.async_inference.robot_client --server_address=127.0.0.1:8080 \\
        --policy_type=llava3d_fusion --pretrained_name_or_path=<checkpoint> --robot.type=... ...

Real-time chunking is not available through this protocol: LeRobot's client sends no inference delay
or leftover actions (it blends overlapping chunks with ``--aggregate_fn_name`` instead).
"""

import functools
import logging
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field
from typing import Any

import draccus
import grpc
import torch
from lerobot.async_inference.configs import PolicyServerConfig
from lerobot.async_inference.helpers import RemotePolicyConfig, TimedAction, TimedObservation
from lerobot.configs import PreTrainedConfig
from lerobot.policies import get_policy_class, make_pre_post_processors
from lerobot.transport import services_pb2, services_pb2_grpc  # type: ignore
from lerobot.transport.utils import receive_bytes_in_chunks
from lerobot.utils.import_utils import register_third_party_plugins

from lerobot_llava3d_fusion.tools.remote_observation import check_policy_inputs, prepare_remote_observation
from lerobot_llava3d_fusion.tools.safe_unpickle import UnsafePickleError, safe_loads

logger = logging.getLogger(__name__)


@dataclass
class Llava3DFusionServerConfig(PolicyServerConfig):
    """LeRobot's ``PolicyServerConfig`` (``--port``, ``--fps``, ``--inference_latency``,
    ``--obs_queue_timeout``) with a loopback default host and seeded sampling."""

    # Address to bind. 127.0.0.1 (default) is reachable from this machine only: reach it through an SSH
    # tunnel (docs/deployment.md); 0.0.0.0 exposes an unauthenticated, unencrypted port.
    host: str = "127.0.0.1"
    # Sample every chunk from the same noise, torch.Generator().manual_seed(noise_seed): reproducible
    # actions for one observation. Default: fresh noise per chunk.
    noise_seed: int | None = None
    # gRPC worker threads.
    max_workers: int = 4


@dataclass
class PreparedObservation(TimedObservation):
    """A received observation with its preprocessed batch, checked before it is queued."""

    batch: dict[str, Any] = field(default_factory=dict)


@functools.cache
def policy_server_class() -> type:
    """``Llava3DFusionPolicyServer``, LeRobot's ``PolicyServer`` subclass. Built on first use: importing
    LeRobot's server module creates a log file under ``./logs``, which merely importing this package
    must not do."""
    from lerobot.async_inference.policy_server import PolicyServer

    class Llava3DFusionPolicyServer(PolicyServer):
        """LeRobot's ``PolicyServer`` with registered policy types, depth, safe unpickling and clear errors."""

        # ------------------------------------------------------------------ client messages

        def SendPolicyInstructions(self, request, context):
            if not self.running:
                self.logger.warning("Server is not running. Ignoring policy instructions.")
                return services_pb2.Empty()
            specs = _load_message(request.data, RemotePolicyConfig, context)
            known = PreTrainedConfig.get_known_choices()
            if specs.policy_type not in known:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"--policy_type={specs.policy_type!r} is not a registered policy type; this server knows "
                    f"{sorted(known)} (install the policy's package on the server).",
                )
            self.logger.info(
                f"Loading {specs.policy_type} from {specs.pretrained_name_or_path} on {specs.device} "
                f"for {context.peer()}"
            )
            start = time.perf_counter()
            try:
                policy = get_policy_class(specs.policy_type).from_pretrained(specs.pretrained_name_or_path)
            except Exception as error:  # noqa: BLE001 - any bad path or checkpoint: tell the client, keep serving
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"cannot load {specs.pretrained_name_or_path}: {error}"
                )
            self.policy = policy.to(specs.device)
            self.policy.eval()
            device_override = {"device": specs.device}
            self.preprocessor, self.postprocessor = make_pre_post_processors(
                self.policy.config,
                pretrained_path=specs.pretrained_name_or_path,
                preprocessor_overrides={
                    "device_processor": device_override,
                    "rename_observations_processor": {"rename_map": specs.rename_map},
                },
                postprocessor_overrides={"device_processor": device_override},
            )
            self.device = specs.device
            self.policy_type = specs.policy_type
            self.lerobot_features = specs.lerobot_features
            self.actions_per_chunk = specs.actions_per_chunk
            self.rename_map = specs.rename_map
            self.logger.info(f"Policy ready in {time.perf_counter() - start:.1f}s")
            return services_pb2.Empty()

        def SendObservations(self, request_iterator, context):
            received = receive_bytes_in_chunks(request_iterator, None, self.shutdown_event, self.logger)
            if received is None:  # the server is shutting down
                return services_pb2.Empty()
            timed = _load_message(received, TimedObservation, context)
            if self.policy is None:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, "no policy loaded: send policy instructions first"
                )
            try:
                raw = timed.get_observation()
                observation = prepare_remote_observation(raw, self.lerobot_features, self.policy.config)
                check_policy_inputs(observation, self.policy.config, self.rename_map)
                batch = self.preprocessor(observation)
            except (ValueError, KeyError, TypeError, RuntimeError) as error:
                message = f"observation #{timed.get_timestep()} refused: {error}"
                self.logger.error(message)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            observation = PreparedObservation(
                timestamp=timed.timestamp,
                timestep=timed.timestep,
                observation=raw,
                must_go=timed.must_go,
                batch=batch,
            )
            if not self._enqueue_observation(observation):
                self.logger.debug(f"Observation #{timed.get_timestep()} has been filtered out")
            return services_pb2.Empty()

        # ------------------------------------------------------------------------ inference

        def _predict_action_chunk(self, observation_t: PreparedObservation) -> list[TimedAction]:
            """The policy's chunk for a checked, preprocessed observation, unnormalised, as timed actions."""
            self.last_processed_obs = observation_t
            chunk = self._get_action_chunk(observation_t.batch)  # (1, actions_per_chunk, action_dim)
            actions = torch.stack([self.postprocessor(chunk[:, i]) for i in range(chunk.shape[1])], dim=1)
            actions = actions.squeeze(0).detach().cpu()
            return self._time_action_chunk(
                observation_t.get_timestamp(), list(actions), observation_t.get_timestep()
            )

        def _get_action_chunk(self, observation: dict[str, torch.Tensor]) -> torch.Tensor:
            """(1, actions_per_chunk, action_dim); from the seeded noise with ``--noise_seed`` (flow-matching
            policies: noise (1, chunk_size, max_action_dim))."""
            sampling = {}
            if self.config.noise_seed is not None:
                config = self.policy.config
                shape = (1, config.chunk_size, config.max_action_dim)
                generator = torch.Generator().manual_seed(self.config.noise_seed)
                sampling["noise"] = torch.randn(shape, generator=generator).to(self.device)
            chunk = self.policy.predict_action_chunk(observation, **sampling)
            return chunk[:, : self.actions_per_chunk, :]

    return Llava3DFusionPolicyServer


def _load_message(data: bytes, expected: type, context) -> Any:
    """A client message through the restricted unpickler; a refused or wrong message aborts the call."""
    try:
        message = safe_loads(data)
    except UnsafePickleError as error:
        logger.error(f"{context.peer()}: {error}")
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    except Exception as error:  # noqa: BLE001 - truncated or corrupt bytes fail in many ways
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable message: {error}")
    if not isinstance(message, expected):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"expected a {expected.__name__}, got {type(message).__name__}"
        )
    return message


def start_server(config: Llava3DFusionServerConfig) -> tuple[grpc.Server, Any]:
    """Start serving on ``config.host:config.port``; returns (the gRPC server, the policy server) at
    once, ``server.stop(None)`` stops it."""
    register_third_party_plugins()
    policy_server = policy_server_class()(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers))
    services_pb2_grpc.add_AsyncInferenceServicer_to_server(policy_server, server)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind {address}: is the port in use? Pick another with --port.")
    server.start()
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            f"serving on {address}: anyone who reaches it can drive the robot's policy. The connection is "
            "neither encrypted nor authenticated; prefer 127.0.0.1 and an SSH tunnel (docs/deployment.md)."
        )
    logger.info(f"llava3d_fusion policy server on {address}")
    return server, policy_server


@draccus.wrap()
def serve(config: Llava3DFusionServerConfig) -> None:
    logger.info(asdict(config))
    server, _ = start_server(config)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(grace=1)


def main() -> None:
    serve()


if __name__ == "__main__":
    main()
