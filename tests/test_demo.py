"""The demo's own pieces: its backbone checkpoint and the reference success rates."""

import pytest
import torch

from lerobot_llava3d_fusion.demo import reference_success, write_demo_backbone
from lerobot_llava3d_fusion.envs.touch_block import PALETTE
from lerobot_llava3d_fusion.vlm import load_backbone


def test_demo_backbone_is_a_loadable_llava_checkpoint(tmp_path):
    directory = write_demo_backbone(tmp_path / "backbone")
    backbone = load_backbone(str(directory), load_weights=True)
    assert backbone.patch_grid == (8, 8)  # 64 px images in 8 px patches
    assert backbone.language_model.config.hidden_size == 128
    # Word-level: one token per word, each colour its own token, no unknown word in an instruction.
    tokenizer = backbone.tokenizer
    tokens = tokenizer("touch the top of the red block")["input_ids"]
    assert len(tokens) == 7 and tokenizer.unk_token_id not in tokens
    colours = {tokenizer(f"touch the top of the {c} block")["input_ids"][5] for c in PALETTE}
    assert len(colours) == len(PALETTE) and tokenizer.unk_token_id not in colours
    assert tokenizer("touch the purple block")["input_ids"][2] == tokenizer.unk_token_id
    # Written once: a second call keeps the same weights.
    before = backbone.language_model.embed_tokens.weight.clone()
    again = load_backbone(str(write_demo_backbone(directory)), load_weights=True)
    assert torch.equal(again.language_model.embed_tokens.weight, before)


def test_reference_success_rates_bracket_the_task():
    assert reference_success("expert", 10) == 100.0
    assert reference_success("random", 10) <= 10.0


def test_the_task_needs_depth_and_language():
    # An expert that lacks the heights, or does not know which block is named, mostly fails.
    assert reference_success("expert without depth", 40) <= 50.0
    assert reference_success("expert without language", 40) <= 50.0
    with pytest.raises(ValueError, match="policy must be one of"):
        reference_success("oracle", 1)
