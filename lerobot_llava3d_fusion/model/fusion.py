"""Deep fusion: the VLM stream (prefix) and the action-expert stream (suffix) joined at every layer.

For each layer, each stream applies its own input norm and q/k/v projections; q/k/v of both
streams are concatenated along the sequence, rotated with joint position ids, and ONE attention
call (SDPA) runs over them with the joint mask; each stream then applies its own o_proj, residual,
post-attention norm, MLP and residual. The decoder layers are transformers' own modules
(Llama/Mistral/Qwen2 layout); only their sub-modules are called here.

Attention pattern (True = may attend):
    prefix queries -> valid prefix keys (bidirectional, never the suffix)
    suffix queries -> valid prefix keys + every suffix key (one bidirectional block)
The KV cache of the prefix is built with exactly this prefix mask, so cached and uncached sampling
agree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class PrefixKVCache:
    """Keys/values of the prefix for every layer, in buffers with room for the suffix, plus what
    every Euler step of the chunk shares (suffix rotary embedding and attention mask).

    keys[i], values[i]: (B, H_kv, L_prefix + L_suffix, D). The prefix part is written once; every
    Euler step overwrites the suffix part in place, so the prefix is never copied.
    """

    keys: list[Tensor]
    values: list[Tensor]
    prefix_length: int
    suffix_rotation: tuple[Tensor, Tensor]  # RoPE (cos, sin) of the suffix positions, (B, L_suffix, D)
    suffix_mask: Tensor | None  # (B, 1, 1, L_prefix + L_suffix) bool; None when no prefix token is padding


# The decoder contract: what the fusion loop reads from a transformers base decoder model (`LlamaModel`,
# `MistralModel`, `Qwen2Model`, ...). The model has `embed_tokens`, `layers`, `norm` and `rotary_emb`
# (called as `rotary_emb(hidden, position_ids) -> (cos, sin)`); each layer has exactly these parts,
# and its attention these projections plus `head_dim` and `scaling`; and the model's own forward is
# embed -> for each layer: x + o_proj(attention(input_layernorm(x))), then x + mlp(post_attention_layernorm(x))
# -> norm, with nothing else (no embedding scale, no extra norms), which `check_decoder_contract` verifies
# by running both on a few tokens.
DECODER_MODEL_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")
DECODER_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
SUPPORTED_DECODERS = "Llama, Mistral, Qwen2 and decoders of the same layout"


def check_decoder_contract(llm: nn.Module, name: str) -> None:
    """Raise, naming what differs, unless `llm` is a decoder the fusion loop can drive exactly."""
    kind = type(llm).__name__
    missing = [part for part in DECODER_MODEL_PARTS if not hasattr(llm, part)]
    if not missing:
        layer = llm.layers[0]
        missing += [f"layers[0].{part}" for part in DECODER_LAYER_PARTS if not hasattr(layer, part)]
        if hasattr(layer, "self_attn"):
            missing += [f"self_attn.{part}" for part in ATTENTION_PARTS if not hasattr(layer.self_attn, part)]
    if missing:
        raise ValueError(
            f"{name}: its LLM ({kind}) lacks {missing}, which the fusion loop drives; supported: {SUPPORTED_DECODERS}."
        )
    extra = sorted(set(dict(llm.layers[0].named_children())) - set(DECODER_LAYER_PARTS))
    if extra:
        raise ValueError(
            f"{name}: its LLM's layers ({type(llm.layers[0]).__name__}) have parts the fusion loop would skip: "
            f"{extra}; supported: {SUPPORTED_DECODERS}."
        )
    parameter = next(llm.parameters())
    with torch.no_grad():
        hidden = torch.randn(1, 4, llm.embed_tokens.embedding_dim, generator=torch.Generator().manual_seed(0))
        hidden = hidden.to(parameter)
        positions = torch.arange(4, device=parameter.device)[None]
        expected = llm(inputs_embeds=hidden, position_ids=positions).last_hidden_state
        causal = torch.ones(4, 4, dtype=torch.bool, device=parameter.device).tril()[None, None]
        rotation = [llm.rotary_emb(hidden, positions)]
        for layer in llm.layers:
            q, k, v = _project_streams([layer], [hidden], rotation)
            hidden = _attend_and_finish(layer, hidden, q, k, v, causal)
        ours = llm.norm(hidden)
    tolerance = 1e-3 if parameter.dtype == torch.float32 else 3e-2
    error = ((ours - expected).abs().max() / expected.abs().max().clamp(min=1e-6)).item()
    if not error <= tolerance:
        raise ValueError(
            f"{name}: the fusion loop does not reproduce its LLM's ({kind}) own forward (relative "
            f"difference {error:.3g}): the decoder computes something beyond pre-norm attention and MLP "
            f"blocks (e.g. an embedding scale); supported: {SUPPORTED_DECODERS}."
        )


def build_expert_layers(
    llm: nn.Module, width_multiplier: float, mlp_multiplier: float | None = None
) -> tuple[nn.ModuleList, nn.Module]:
    """A narrower copy of the LLM's decoder stack for the action expert.

    Same number of layers, heads, KV heads and head dim as the LLM (so both streams share one
    attention space); hidden width scaled by `width_multiplier`, MLP width by `mlp_multiplier`
    (default: the same). Built with the LLM's own layer classes. When both are 1.0 the expert
    starts as a copy of the LLM layers.
    """
    mlp_multiplier = width_multiplier if mlp_multiplier is None else mlp_multiplier
    if width_multiplier == 1.0 and mlp_multiplier == 1.0:
        return copy.deepcopy(llm.layers), copy.deepcopy(llm.norm)
    config = copy.deepcopy(llm.config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.head_dim = head_dim
    config.hidden_size = int(round(config.hidden_size * width_multiplier))
    config.intermediate_size = int(round(config.intermediate_size * mlp_multiplier))
    layer_cls = type(llm.layers[0])
    layers = nn.ModuleList(layer_cls(config, layer_idx=i) for i in range(len(llm.layers)))
    norm = type(llm.norm)(config.hidden_size, eps=config.rms_norm_eps)
    return layers, norm


def check_head_shapes(vlm_layers: nn.ModuleList, expert_layers: nn.ModuleList) -> None:
    """Both streams must project into the same attention space, layer by layer."""
    if len(vlm_layers) != len(expert_layers):
        raise ValueError(
            f"expert has {len(expert_layers)} layers, the VLM {len(vlm_layers)}: they must match."
        )
    vlm_attn, expert_attn = vlm_layers[0].self_attn, expert_layers[0].self_attn
    vlm_heads = (vlm_attn.q_proj.out_features, vlm_attn.k_proj.out_features, vlm_attn.head_dim)
    expert_heads = (expert_attn.q_proj.out_features, expert_attn.k_proj.out_features, expert_attn.head_dim)
    if vlm_heads != expert_heads:
        raise ValueError(
            "expert and VLM attention head shapes differ (q width, kv width, head_dim): "
            f"VLM {vlm_heads}, expert {expert_heads}; expected them equal."
        )


class LLaVA3DWithActionExpertModel(nn.Module):
    """The deep-fusion transformer with three forward modes: joint, prefix-only and suffix-only."""

    def __init__(
        self,
        llm: nn.Module,
        expert_mode: str,
        expert_width_multiplier: float,
        expert_mlp_multiplier: float | None = None,
    ):
        super().__init__()
        self.vlm_layers = llm.layers
        self.vlm_norm = llm.norm
        self.rotary_emb = llm.rotary_emb
        self.expert_mode = expert_mode
        # Training (joint mode) recomputes each fused layer in the backward pass instead of keeping
        # its activations: memory of one layer's activations instead of all of them, one more forward.
        self.gradient_checkpointing = False
        if expert_mode == "separate":
            self.separate_expert_layers, self.separate_expert_norm = build_expert_layers(
                llm, expert_width_multiplier, expert_mlp_multiplier
            )
            check_head_shapes(self.vlm_layers, self.separate_expert_layers)
        elif expert_mode != "shared":
            raise ValueError(f"expert_mode must be 'shared' or 'separate', got {expert_mode!r}.")

    # In "shared" mode the suffix runs through the LLM's own weights (zero extra parameters); they
    # are not registered twice, so checkpoints hold each tensor once.
    @property
    def expert_layers(self) -> nn.ModuleList:
        return self.vlm_layers if self.expert_mode == "shared" else self.separate_expert_layers

    @property
    def expert_norm(self) -> nn.Module:
        return self.vlm_norm if self.expert_mode == "shared" else self.separate_expert_norm

    @property
    def expert_width(self) -> int:
        return self.expert_norm.weight.shape[0]

    # ----------------------------------------------------------------------------------- modes

    def forward(
        self,
        prefix_embeds: Tensor,
        prefix_pad_mask: Tensor,
        suffix_embeds: Tensor,
        output_prefix: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Joint mode (training): (B, Lp, D_vlm), (B, Lp), (B, Ls, D_exp) -> suffix output (B, Ls, D_exp).

        The prefix's last-layer output feeds nothing (the loss reads the suffix), so its last-layer
        queries, o_proj and MLP are skipped unless `output_prefix` asks for (prefix_out, suffix_out).
        """
        batch, prefix_len = prefix_pad_mask.shape
        suffix_len = suffix_embeds.shape[1]
        prefix_pos, suffix_pos = _position_ids(prefix_pad_mask, suffix_len)
        # (B, 1, Lp + Ls, Lp + Ls): prefix rows see valid prefix keys; suffix rows see those + suffix.
        key_valid = torch.cat([prefix_pad_mask, prefix_pad_mask.new_ones(batch, suffix_len)], dim=1)
        is_suffix_query = torch.arange(prefix_len + suffix_len, device=key_valid.device) >= prefix_len
        is_prefix_key = ~is_suffix_query
        mask = key_valid[:, None, None, :] & (is_prefix_key[None, :] | is_suffix_query[:, None])[None, None]

        rotations = [self.rotary_emb(prefix_embeds, prefix_pos), self.rotary_emb(suffix_embeds, suffix_pos)]
        use_checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.vlm_layers) - 1
        for index, (vlm_layer, expert_layer) in enumerate(
            zip(self.vlm_layers, self.expert_layers, strict=True)
        ):
            suffix_only = index == last and not output_prefix
            args = (vlm_layer, expert_layer, prefix_embeds, suffix_embeds, rotations, mask, suffix_only)
            if use_checkpointing:
                outputs = checkpoint(_fused_layer, *args, use_reentrant=False)
            else:
                outputs = _fused_layer(*args)
            if suffix_only:
                return self.expert_norm(outputs[0])
            prefix_embeds, suffix_embeds = outputs
        return self.vlm_norm(prefix_embeds), self.expert_norm(suffix_embeds)

    def forward_prefix(
        self, prefix_embeds: Tensor, prefix_pad_mask: Tensor, suffix_length: int
    ) -> PrefixKVCache:
        """Prefix-only mode: the prefix keys/values of every layer, for `forward_suffix`.

        Uses the training prefix mask (bidirectional over valid tokens). The last layer only needs
        its keys/values, so its attention and MLP are not run.
        """
        batch, prefix_len = prefix_pad_mask.shape
        prefix_pos, suffix_pos = _position_ids(prefix_pad_mask, suffix_length)
        # Without padding every query sees every key: no mask lets SDPA pick its fastest kernel.
        # (One host sync per chunk, none per Euler step.)
        padded = not bool(prefix_pad_mask.all())
        mask = prefix_pad_mask[:, None, None, :] if padded else None  # (B, 1, 1, Lp)
        suffix_mask = None
        if padded:
            key_valid = torch.cat([prefix_pad_mask, prefix_pad_mask.new_ones(batch, suffix_length)], dim=1)
            suffix_mask = key_valid[:, None, None, :]
        rotation = [self.rotary_emb(prefix_embeds, prefix_pos)]
        keys, values = [], []
        hidden = prefix_embeds
        last = len(self.vlm_layers) - 1
        for index, layer in enumerate(self.vlm_layers):
            q, k, v = _project_streams([layer], [hidden], rotation)
            key_buffer = k.new_empty(batch, k.shape[1], prefix_len + suffix_length, k.shape[3])
            value_buffer = torch.empty_like(key_buffer)
            key_buffer[:, :, :prefix_len] = k
            value_buffer[:, :, :prefix_len] = v
            keys.append(key_buffer)
            values.append(value_buffer)
            if index < last:
                hidden = _attend_and_finish(layer, hidden, q, k, v, mask)
        suffix_rotation = self.rotary_emb(prefix_embeds, suffix_pos)
        return PrefixKVCache(keys, values, prefix_len, suffix_rotation, suffix_mask)

    def forward_suffix(self, suffix_embeds: Tensor, cache: PrefixKVCache) -> Tensor:
        """Suffix-only mode (each Euler step): the suffix attends to the cached prefix and itself."""
        suffix_len = suffix_embeds.shape[1]
        start = cache.prefix_length
        if cache.keys[0].shape[2] != start + suffix_len:
            raise ValueError(
                f"cache was built for a suffix of {cache.keys[0].shape[2] - start} tokens, got {suffix_len}."
            )
        rotation = [cache.suffix_rotation]
        hidden = suffix_embeds
        for layer, key_buffer, value_buffer in zip(self.expert_layers, cache.keys, cache.values, strict=True):
            q, k, v = _project_streams([layer], [hidden], rotation)
            key_buffer[:, :, start:] = k
            value_buffer[:, :, start:] = v
            hidden = _attend_and_finish(layer, hidden, q, key_buffer, value_buffer, cache.suffix_mask)
        return self.expert_norm(hidden)


def _fused_layer(
    vlm_layer: nn.Module,
    expert_layer: nn.Module,
    prefix: Tensor,
    suffix: Tensor,
    rotations: list[tuple[Tensor, Tensor]],
    mask: Tensor,
    suffix_only: bool,
) -> list[Tensor]:
    """One joint layer: [prefix_out, suffix_out], or [suffix_out] when the prefix output feeds nothing
    (the last layer in training: its prefix queries, o_proj and MLP are skipped).

    The suffix finishes first: when the prefix stream stores nothing for the backward pass, a
    checkpointed layer's recomputation (which stops once every stored tensor is back) then never
    reruns the prefix's o_proj and MLP."""
    q, k, v = _project_streams([vlm_layer, expert_layer], [prefix, suffix], rotations)
    prefix_len = prefix.shape[1]
    if suffix_only:
        attention = _attend(expert_layer, q[:, :, prefix_len:], k, v, mask[:, :, prefix_len:])
        return [_finish(expert_layer, suffix, attention)]
    attention = _attend(vlm_layer, q, k, v, mask)  # (B, Lp + Ls, H * D)
    suffix_out = _finish(expert_layer, suffix, attention[:, prefix_len:])
    prefix_attention = attention[:, :prefix_len]
    if not prefix.requires_grad and not any(p.requires_grad for p in vlm_layer.parameters()):
        # A frozen VLM stream (train_expert_only): prefix queries see prefix keys only (the mask), so
        # these rows depend on the suffix in autograd's view alone (their gradient into it is exactly
        # zero). Detached, the prefix's o_proj and MLP store no activations and get no backward pass.
        prefix_attention = prefix_attention.detach()
    return [_finish(vlm_layer, prefix, prefix_attention), suffix_out]


def _position_ids(prefix_pad_mask: Tensor, suffix_len: int) -> tuple[Tensor, Tensor]:
    """Joint RoPE positions: cumsum of valid tokens minus one; the suffix continues after the valid prefix."""
    prefix_pos = torch.cumsum(prefix_pad_mask.long(), dim=1) - 1
    num_valid = prefix_pad_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
    suffix_pos = num_valid + torch.arange(suffix_len, device=prefix_pad_mask.device)[None, :]
    return prefix_pos.clamp(min=0), suffix_pos


def _project_streams(layers, streams, rotations) -> tuple[Tensor, Tensor, Tensor]:
    """Input norm + q/k/v + RoPE per stream, concatenated along the sequence: (B, H, L, D) each."""
    queries, keys, values = [], [], []
    for layer, hidden, (cos, sin) in zip(layers, streams, rotations, strict=True):
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(normed).view(shape).transpose(1, 2)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)
        v = attn.v_proj(normed).view(shape).transpose(1, 2)
        # RoPE in the residual stream's float32, then back to the projections' dtype: under bf16
        # autocast the attention (and the KV cache) is bf16 either way.
        q, k = (x.to(v.dtype) for x in apply_rotary_pos_emb(q, k, cos, sin))
        queries.append(q)
        keys.append(k)
        values.append(v)
    if len(layers) == 1:
        return queries[0], keys[0], values[0]
    return torch.cat(queries, dim=2), torch.cat(keys, dim=2), torch.cat(values, dim=2)


def _attend(layer: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """One SDPA call over (B, H, Lq, D) queries and (B, H_kv, Lk, D) keys/values -> (B, Lq, H * D)."""
    scale = layer.self_attn.scaling
    attention = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return attention.transpose(1, 2).flatten(2)


def _finish(layer: nn.Module, hidden: Tensor, attention: Tensor) -> Tensor:
    """One stream's o_proj, residual, post-attention norm, MLP and residual: (B, L, D) -> (B, L, D)."""
    hidden = hidden + layer.self_attn.o_proj(attention)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _attend_and_finish(
    layer: nn.Module, hidden: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
) -> Tensor:
    """A single stream's attention over `k`/`v` and the rest of its layer."""
    return _finish(layer, hidden, _attend(layer, q, k, v, mask))
