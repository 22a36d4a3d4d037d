"""The fused layer loop is transformers' decoder: same numbers as the decoder layers' own forward.

In `shared` mode prefix and suffix run through the same decoder layers, so the joint forward must
equal transformers' own `DecoderLayer.forward` run over the concatenated sequence [prefix; suffix]
with the intended 4D mask (prefix: valid prefix keys only; suffix: valid prefix keys and every suffix
key) and the joint RoPE positions, followed by the final norm.
"""

import pytest
import torch
from helpers import tiny_policy


def reference_forward(fusion, prefix, prefix_mask, suffix):
    """transformers' decoder layers over [prefix; suffix]: (prefix output, suffix output)."""
    batch, prefix_len = prefix_mask.shape
    suffix_len = suffix.shape[1]
    valid = torch.cat([prefix_mask, torch.ones(batch, suffix_len, dtype=torch.bool)], dim=1)
    # Query i may see key j when j is valid and (j is a prefix token or i is a suffix token).
    is_suffix = torch.arange(prefix_len + suffix_len) >= prefix_len
    allowed = (~is_suffix)[None, :] | is_suffix[:, None]  # (L, L)
    mask = (allowed[None] & valid[:, None, :])[:, None]  # (B, 1, L, L)
    # Padding tokens take no position: positions count valid tokens only.
    positions = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)
    hidden = torch.cat([prefix, suffix], dim=1)
    position_embeddings = fusion.rotary_emb(hidden, positions)
    for layer in fusion.vlm_layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings)
    hidden = fusion.vlm_norm(hidden)
    return hidden[:, :prefix_len], hidden[:, prefix_len:]


@pytest.mark.parametrize("llm_type", ["qwen2", "llama", "mistral"])
def test_joint_forward_equals_the_decoder_layers_own_forward(llm_type):
    policy = tiny_policy(tiny_llm_type=llm_type, expert_mode="shared")
    fusion = policy.model.fusion
    assert type(fusion.vlm_layers[0]).__name__.lower().startswith(llm_type)
    generator = torch.Generator().manual_seed(0)
    width = fusion.expert_width
    prefix = torch.randn(2, 11, width, generator=generator)
    suffix = torch.randn(2, 5, width, generator=generator)
    prefix_mask = torch.ones(2, 11, dtype=torch.bool)
    prefix_mask[1, 8:] = False  # the second prompt is padded

    with torch.no_grad():
        prefix_out, suffix_out = fusion(prefix, prefix_mask, suffix, output_prefix=True)
        suffix_only = fusion(prefix, prefix_mask, suffix)
        expected_prefix, expected_suffix = reference_forward(fusion, prefix, prefix_mask, suffix)

    torch.testing.assert_close(suffix_out, expected_suffix, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(suffix_only, expected_suffix, atol=1e-5, rtol=1e-5)
    valid = prefix_mask[..., None].expand_as(prefix_out)  # padded positions' outputs are never read
    torch.testing.assert_close(prefix_out[valid], expected_prefix[valid], atol=1e-5, rtol=1e-5)
