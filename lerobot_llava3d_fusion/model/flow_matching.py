"""Flow matching over action chunks: suffix embedding, training loss and Euler sampler.

Suffix layout (the original system's): [state token (optional)] [action token x H] [time token].
Convention (openpi): x_t = t * noise + (1 - t) * actions, target velocity u = noise - actions;
sampling integrates from t = 1 (noise) to t = 0 (actions).

Actions are zero-padded from the robot's `action_dim` to `max_action_dim`. The padded dims carry no
target, so the expert never sees them: they are zero in x_t at every step of training and sampling
(otherwise training would show it t * noise there and sampling an untrained drift).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.policies.common.flow_matching import euler_integrate, sample_time_beta
from lerobot.policies.common.vla_utils import create_sinusoidal_pos_embedding
from torch import Tensor, nn

if TYPE_CHECKING:
    from lerobot.policies.rtc.modeling_rtc import RTCProcessor

# Maps suffix embeddings (B, Ls, W) to the expert's final hidden states (B, Ls, W).
SuffixTransformer = Callable[[Tensor], Tensor]


class FlowMatchingActionExpert(nn.Module):
    """Embeds the suffix, reads velocities out of the expert stream, trains and samples."""

    def __init__(
        self,
        width: int,
        chunk_size: int,
        action_dim: int,
        max_state_dim: int,
        max_action_dim: int,
        use_state_token: bool = True,
        min_period: float = 4e-3,
        max_period: float = 4.0,
    ):
        super().__init__()
        if not 0 < action_dim <= max_action_dim:
            raise ValueError(f"action_dim ({action_dim}) must be in [1, max_action_dim={max_action_dim}].")
        self.chunk_size = chunk_size
        self.action_dim = action_dim
        self.max_action_dim = max_action_dim
        self.use_state_token = use_state_token
        self.min_period = min_period
        self.max_period = max_period
        self.state_proj = nn.Linear(max_state_dim, width) if use_state_token else None
        self.action_in_proj = nn.Linear(max_action_dim, width)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)
        self.action_out_proj = nn.Linear(width, max_action_dim)

    @property
    def suffix_length(self) -> int:
        return int(self.use_state_token) + self.chunk_size + 1

    @property
    def action_slice(self) -> slice:
        start = int(self.use_state_token)
        return slice(start, start + self.chunk_size)

    def embed_suffix(self, state: Tensor, noisy_actions: Tensor, time: Tensor) -> Tensor:
        """state (B, S_max), noisy actions (B, H, A_max), time (B,) -> suffix tokens (B, Ls, W), float32:
        the expert's residual stream stays float32 under bf16 autocast, as the prefix's does."""
        dtype = self.action_in_proj.weight.dtype
        tokens = []
        if self.state_proj is not None:
            tokens.append(self.state_proj(state.to(dtype))[:, None])
        tokens.append(self.action_in_proj(noisy_actions.to(dtype)))
        width = self.time_mlp_in.in_features
        time_emb = create_sinusoidal_pos_embedding(
            time, width, self.min_period, self.max_period, device=time.device
        ).to(dtype)
        tokens.append(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb)))[:, None])
        return torch.cat(tokens, dim=1).float()

    def without_padding(self, actions: Tensor) -> Tensor:
        """(B, H, A_max) with the padded dims (>= action_dim) set to zero."""
        return F.pad(actions[..., : self.action_dim], (0, self.max_action_dim - self.action_dim))

    def velocity(self, transformer: SuffixTransformer, state: Tensor, x_t: Tensor, time: Tensor) -> Tensor:
        """Predicted velocity (B, H, A_max), float32, zero in the padded dims."""
        hidden = transformer(self.embed_suffix(state, self.without_padding(x_t), time))
        return self.without_padding(self.action_out_proj(hidden[:, self.action_slice]).float())

    def compute_loss(
        self,
        transformer: SuffixTransformer,
        state: Tensor,
        actions: Tensor,
        noise: Tensor,
        time: Tensor,
    ) -> Tensor:
        """Element-wise squared error (B, H, A_max) between predicted and target velocity; the padded
        dims' entries are meaningless (the caller leaves them out of the loss)."""
        t = time[:, None, None]
        x_t = t * noise + (1.0 - t) * actions
        target = noise - actions
        return F.mse_loss(self.velocity(transformer, state, x_t, time), target, reduction="none")

    def sample_actions(
        self,
        transformer: SuffixTransformer,
        state: Tensor,
        noise: Tensor,
        num_steps: int,
        *,
        rtc_processor: RTCProcessor | None = None,
        rtc_enabled: bool = False,
        inference_delay: int | None = None,
        prev_chunk_left_over: Tensor | None = None,
        execution_horizon: int | None = None,
    ) -> Tensor:
        """Euler integration from x_1 = noise (B, H, A_max) at t = 1 to actions at t = 0.

        With an `rtc_processor` (real-time chunking, or its debug tracking) the loop is LeRobot's
        `euler_integrate`, whose RTC hook guides each velocity towards `prev_chunk_left_over`
        (B or none, T_prev, A <= A_max) over the first actions. Otherwise the time grid is built on the
        device once: unlike a Python float turned into a tensor at every step, indexing it never
        copies from the host, so the GPU runs the steps unsynchronised (and a CUDA graph can replay them).
        """
        if rtc_processor is not None:

            def denoise(x_t: Tensor, time: Tensor) -> Tensor:
                # LeRobot's RTC guidance differentiates x1 = x_t - t * v only with respect to x_t, taking
                # v as given (it evaluates v before x_t requires grad): no graph through the model.
                with torch.no_grad():
                    return self.velocity(transformer, state, x_t, time)

            return euler_integrate(
                denoise,
                noise,
                num_steps,
                rtc_processor=rtc_processor,
                rtc_enabled=rtc_enabled,
                inference_delay=inference_delay,
                prev_chunk_left_over=prev_chunk_left_over,
                execution_horizon=execution_horizon,
            )
        batch = noise.shape[0]
        times = torch.linspace(1.0, 0.0, num_steps + 1, device=noise.device)[:-1]  # (num_steps,)
        dt = -1.0 / num_steps
        x_t = self.without_padding(noise)
        for step in range(num_steps):
            x_t = x_t + dt * self.velocity(transformer, state, x_t, times[step].expand(batch))
        return x_t


def sample_time(
    batch_size: int, device: torch.device, method: str, alpha: float, beta: float, scale: float, offset: float
) -> Tensor:
    """Training times (B,): Beta(alpha, beta) * scale + offset, or uniform on [offset, offset + scale]."""
    if method == "beta":
        return sample_time_beta(batch_size, device, alpha=alpha, beta=beta, scale=scale, offset=offset)
    return torch.rand(batch_size, device=device) * scale + offset
