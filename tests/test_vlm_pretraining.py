"""The VLM pretraining stage and the touch_block image-text pairs it trains on."""

import numpy as np
import pytest
import torch
from transformers import SiglipImageProcessor

from lerobot_llava3d_fusion.backbones.loading import build_tiny_llava, build_word_tokenizer, load_backbone
from lerobot_llava3d_fusion.demo.touch_block_captions import (
    WHAT_COLOUR,
    WHERE_BLOCK,
    WHERE_GRIPPER,
    caption_vocabulary,
    cell_words,
    project,
    touch_block_image_text_pairs,
)
from lerobot_llava3d_fusion.demo.vlm_pretraining import (
    ImageTextPair,
    PairBatcher,
    pretrain_vlm,
    read_image_text_pairs,
    write_image_text_pairs,
)
from lerobot_llava3d_fusion.envs import touch_block

IMAGE_SIZE = (32, 32)


@pytest.fixture
def caption_backbone(tmp_path):
    """A tiny LLaVA checkpoint on disk whose tokenizer knows the pairs' words."""
    torch.manual_seed(0)
    model, tokenizer = build_tiny_llava(tokenizer=build_word_tokenizer(caption_vocabulary(grid=4)))
    directory = tmp_path / "backbone"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def test_block_answers_name_the_cell_that_shows_the_block():
    pairs = touch_block_image_text_pairs(40, seed=3, num_blocks=(1, 4), image_size=(64, 64), grid=8)
    checked = 0
    for pair in pairs:
        if pair.prompt.startswith("where is the") and pair.prompt != WHERE_GRIPPER:
            colour = pair.prompt.split()[-2]
            words = pair.answer.split()
            column, row = int(words[1]), int(words[3])
            # Pixels of the block's colour whose cell is (column, row): the block is there.
            cell = pair.image[row * 8 : (row + 1) * 8, column * 8 : (column + 1) * 8]
            assert (cell == touch_block.PALETTE[colour]).all(axis=-1).any(), (pair.prompt, pair.answer)
            checked += 1
    assert checked > 40


def test_each_block_is_asked_with_the_instruction_and_a_where_question():
    pairs = touch_block_image_text_pairs(5, seed=1, num_blocks=(3, 3), image_size=(64, 64))
    image_pairs = [p for p in pairs if p.image is pairs[0].image]
    prompts = [p.prompt for p in image_pairs]
    colours = {
        p.prompt.split()[3]
        for p in image_pairs
        if p.prompt.startswith("where is the ") and "gripper" not in p.prompt
    }
    assert len(colours) == 3
    for colour in colours:
        where = image_pairs[prompts.index(WHERE_BLOCK.format(colour=colour))]
        instruction = image_pairs[prompts.index(touch_block.INSTRUCTION_TEMPLATE.format(colour=colour))]
        assert where.answer == instruction.answer
    asked = next(p for p in image_pairs if p.prompt.startswith("what colour"))
    cell = asked.prompt.removeprefix(WHAT_COLOUR.format(cell=""))
    assert image_pairs[prompts.index(WHERE_BLOCK.format(colour=asked.answer))].answer == cell
    assert WHERE_GRIPPER in prompts


def test_project_and_cell_words_follow_the_camera():
    renderer = touch_block.TouchBlockRenderer(64, 64)
    pixel = project(renderer, np.array([[0.0, 0.0, 0.3]]))[0]
    np.testing.assert_allclose(pixel, [31.5, 31.5], atol=1e-9)  # the optical axis hits the centre
    # World +x is image right, world +y is image up (rows grow towards -y).
    right_up = project(renderer, np.array([[0.1, 0.1, 0.0]]))[0]
    assert right_up[0] > 31.5 and right_up[1] < 31.5
    assert cell_words(np.array([63.9, 0.0]), (64, 64), 16) == "x 15 y 0"
    assert cell_words(np.array([-1.0, 70.0]), (64, 64), 16) == "x 0 y 15"


def test_pairs_round_trip_through_disk(tmp_path):
    pairs = touch_block_image_text_pairs(3, seed=0, image_size=IMAGE_SIZE, grid=4)
    write_image_text_pairs(tmp_path / "pairs", pairs)
    read = read_image_text_pairs(tmp_path / "pairs")
    assert [(p.prompt, p.answer) for p in read] == [(p.prompt, p.answer) for p in pairs]
    for original, loaded in zip(pairs, read, strict=True):
        np.testing.assert_array_equal(original.image, loaded.image)


def test_bad_pairs_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs.jsonl"):
        read_image_text_pairs(tmp_path)
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "prompt": "where is the red block"}\n')
    with pytest.raises(ValueError, match="missing \\['answer'\\]"):
        read_image_text_pairs(tmp_path)


def test_batches_mark_the_answer_tokens_only():
    tokenizer = build_word_tokenizer(caption_vocabulary(grid=4))
    image = np.zeros((*IMAGE_SIZE, 3), dtype=np.uint8)
    pairs = [
        ImageTextPair(image, "where is the gripper", "x 1 y 2"),
        ImageTextPair(image, "where is the red block", "red"),
    ]
    images, ids, valid, answer = PairBatcher(tokenizer, pairs).batch([0, 1])
    assert images.shape == (2, 3, *IMAGE_SIZE)
    assert valid.sum(1).tolist() == [4 + 4 + 1, 5 + 1 + 1]  # prompt + answer + eos
    assert tokenizer.decode(ids[0][answer[0]]) == "x 1 y 2 <eos>"
    assert tokenizer.decode(ids[1][answer[1]]) == "red <eos>"
    assert (ids[0][~valid[0]] == tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="words the tokenizer does not know"):
        PairBatcher(tokenizer, [ImageTextPair(image, "where is the purple block", "x 1 y 2")])


def test_pretraining_learns_the_pairs_and_saves_a_loadable_backbone(caption_backbone, tmp_path):
    pairs = touch_block_image_text_pairs(60, seed=0, num_blocks=(1, 2), image_size=IMAGE_SIZE, grid=4)
    output = tmp_path / "pretrained"
    summary = pretrain_vlm(
        caption_backbone,
        pairs,
        output,
        steps=60,
        batch_size=32,
        lr=3e-3,
        warmup_steps=5,
        validation_pairs=20,
    )
    assert summary["last_loss"] < 0.5 * summary["first_loss"]

    before = load_backbone(str(caption_backbone), load_weights=True)
    after = load_backbone(str(output), load_weights=True)
    trained = dict(after.language_model.named_parameters())
    changed = [
        name for name, p in before.language_model.named_parameters() if not torch.equal(p, trained[name])
    ]
    assert len(changed) == len(trained)  # the saved weights are the trained ones, every tensor moved
    assert after.image_mean == before.image_mean and len(after.tokenizer) == len(before.tokenizer)
