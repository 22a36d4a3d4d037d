"""Vision-language pretraining of a LLaVA backbone on image-text pairs, before VLA training.

A VLA learns to follow instructions far sooner from a VLM that already grounds words in images
(which block is "the red block", where it is) than from one that must learn it from actions alone.
This stage trains a LLaVA checkpoint in transformers' layout (config.json, safetensors weights,
tokenizer, preprocessor_config.json) by next-token prediction of answers and saves it in the same
layout, ready for `--policy.vlm_model_name=<output dir> --policy.load_vlm_weights=true`.

Data: a directory holding `pairs.jsonl`, one JSON object per line,
``{"image": "<path relative to the directory>", "prompt": "...", "answer": "..."}``.
Each training sequence is ``[image patch tokens][prompt tokens][answer tokens][eos]`` with the
image tokens made exactly as the policy makes them (same resize, normalisation, tower layer and
projector); the loss is the cross-entropy of the answer and eos tokens under the LLM's causal mask.

    python -m lerobot_llava3d_fusion.demo.vlm_pretraining --backbone DIR --pairs DIR --output DIR --steps 2000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from lerobot_llava3d_fusion.backbones.backbone import ImageEncoder, load_image_normalisation
from lerobot_llava3d_fusion.backbones.loading import LLAVA_MODEL_CLASSES, backbone_from_llava, load_tokenizer

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageTextPair:
    image: np.ndarray  # (H, W, 3) uint8
    prompt: str
    answer: str


def write_image_text_pairs(directory: Path, pairs: list[ImageTextPair]) -> None:
    """Write `pairs` in the layout `read_image_text_pairs` reads (PNG images + pairs.jsonl)."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    with open(directory / PAIRS_FILE, "w") as lines:
        for index, pair in enumerate(pairs):
            image_path = Path("images") / f"{index:06d}.png"
            Image.fromarray(pair.image).save(directory / image_path)
            lines.write(
                json.dumps({"image": str(image_path), "prompt": pair.prompt, "answer": pair.answer}) + "\n"
            )


def read_image_text_pairs(directory: Path) -> list[ImageTextPair]:
    """The pairs of a `pairs.jsonl` directory, images decoded to (H, W, 3) uint8."""
    directory = Path(directory)
    path = directory / PAIRS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{directory}: no {PAIRS_FILE} (one JSON object per line: image, prompt, answer)"
        )
    pairs = []
    with open(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = {"image", "prompt", "answer"} - record.keys()
            if missing:
                raise ValueError(f"{path}:{line_number}: missing {sorted(missing)}")
            if not record["answer"].strip():
                raise ValueError(f"{path}:{line_number}: empty answer (nothing to learn)")
            image = np.asarray(Image.open(directory / record["image"]).convert("RGB"))
            pairs.append(ImageTextPair(image, record["prompt"], record["answer"]))
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


class PairBatcher:
    """Turns image-text pairs into the model's inputs: pixels and right-padded token sequences."""

    def __init__(self, tokenizer, pairs: list[ImageTextPair]):
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs eos and pad tokens")
        self.tokenizer = tokenizer
        self.images = torch.from_numpy(np.stack([pair.image for pair in pairs])).permute(0, 3, 1, 2)
        self.prompts = [self._ids(pair.prompt) for pair in pairs]
        self.answers = [self._ids(pair.answer) + [tokenizer.eos_token_id] for pair in pairs]
        unknown = [pair.prompt + " / " + pair.answer for pair in pairs if self._has_unknown(pair)]
        if unknown:
            raise ValueError(
                f"{len(unknown)} pairs have words the tokenizer does not know, e.g. {unknown[0]!r}"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _has_unknown(self, pair: ImageTextPair) -> bool:
        unk = self.tokenizer.unk_token_id
        return unk is not None and unk in self._ids(pair.prompt) + self._ids(pair.answer)

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> images (B, 3, H, W) in [0, 1], token ids (B, T), valid mask (B, T) bool, and the answer
        mask (B, T) bool marking the positions whose token is predicted (answer and eos)."""
        sequences = [self.prompts[i] + self.answers[i] for i in indices]
        length = max(map(len, sequences))
        ids = torch.full((len(indices), length), self.tokenizer.pad_token_id)
        valid = torch.zeros(len(indices), length, dtype=torch.bool)
        answer = torch.zeros_like(valid)
        for row, (i, sequence) in enumerate(zip(indices, sequences, strict=True)):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            valid[row, : len(sequence)] = True
            answer[row, len(self.prompts[i]) : len(sequence)] = True
        return self.images[indices].float() / 255.0, ids, valid, answer


class CaptioningModel(torch.nn.Module):
    """A transformers LLaVA model seen through the policy's image encoder, with a next-token loss."""

    def __init__(self, llava: torch.nn.Module, tokenizer, image_mean, image_std):
        super().__init__()
        self.llava = llava
        backbone = backbone_from_llava(llava, tokenizer, image_mean, image_std)
        self.image_encoder = ImageEncoder.of(backbone)
        self.language_model = backbone.language_model
        self.image_size = backbone.image_size
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def logits(self, images: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
        """(B, 3, H, W) images in [0, 1], (B, T) ids and mask -> next-token logits (B, T, V) of the text
        positions: logits[:, t] predicts ids[:, t]."""
        size = (self.image_size, self.image_size)
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        pixels = (images - self.image_mean) / self.image_std
        image_tokens = self.image_encoder.project(self.image_encoder.features(pixels))  # (B, P, D)
        text_tokens = self.language_model.embed_tokens(ids)  # (B, T, D)
        embeddings = torch.cat([image_tokens, text_tokens], dim=1)
        mask = torch.cat([valid.new_ones(image_tokens.shape[:2]), valid], dim=1).long()
        hidden = self.language_model(inputs_embeds=embeddings, attention_mask=mask).last_hidden_state
        # The token at sequence position s is predicted by the hidden state at s - 1.
        num_patches = image_tokens.shape[1]
        return self.llava.lm_head(hidden[:, num_patches - 1 : -1])

    def loss_and_accuracy(self, images, ids, valid, answer) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over answer tokens, and the fraction of answers predicted exactly
        (every answer token the argmax)."""
        logits = self.logits(images, ids, valid)
        loss = F.cross_entropy(logits[answer], ids[answer])
        correct = (logits.argmax(-1) == ids) | ~answer
        return loss, correct.all(dim=1).float().mean()


def pretrain_vlm(
    backbone: str | Path,
    pairs: list[ImageTextPair],
    output: str | Path,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 100,
    validation_pairs: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """Train the LLaVA checkpoint in `backbone` on `pairs` for `steps` AdamW steps (cosine schedule
    after a linear warmup), save it to `output`, and return the first and last training losses and
    the exact-answer accuracy on `validation_pairs` held-out pairs before and after."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive (got {steps}, {batch_size})")
    if not 0 <= validation_pairs < len(pairs):
        raise ValueError(
            f"validation_pairs must be in [0, {len(pairs)}) for {len(pairs)} pairs (got {validation_pairs})"
        )
    backbone, output = str(backbone), Path(output)
    torch.manual_seed(seed)
    llava = _load_llava(backbone)
    tokenizer = load_tokenizer(backbone)
    model = CaptioningModel(llava, tokenizer, *load_image_normalisation(backbone)).train()

    batcher = PairBatcher(tokenizer, pairs)
    order = np.random.default_rng(seed).permutation(len(batcher))
    validation, training = order[:validation_pairs].tolist(), order[validation_pairs:]

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _warmup_cosine(step, warmup_steps, steps)
    )
    rng = np.random.default_rng(seed + 1)
    summary = {"validation_accuracy_before": _accuracy(model, batcher, validation, batch_size)}
    progress = tqdm(range(steps), desc="VLM pretraining", unit="step")
    for step in progress:
        indices = rng.choice(training, size=min(batch_size, len(training)), replace=False).tolist()
        loss, accuracy = model.loss_and_accuracy(*batcher.batch(indices))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step == 0:
            summary["first_loss"] = loss.item()
        progress.set_postfix(loss=f"{loss.item():.3f}", answers=f"{accuracy.item():.2f}")
    summary["last_loss"] = loss.item()
    summary["validation_accuracy_after"] = _accuracy(model, batcher, validation, batch_size)
    logger.info("VLM pretraining: %s", summary)
    _save(llava, tokenizer, backbone, output)
    return summary


def _load_llava(name: str) -> torch.nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    if config.model_type not in LLAVA_MODEL_CLASSES:
        raise ValueError(
            f"{name}: VLM pretraining needs a transformers LLaVA checkpoint ({sorted(LLAVA_MODEL_CLASSES)}), "
            f"got model_type={config.model_type!r}"
        )
    return LLAVA_MODEL_CLASSES[config.model_type].from_pretrained(name, dtype=torch.float32)


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _accuracy(model: CaptioningModel, batcher: PairBatcher, indices: list[int], batch_size: int) -> float:
    """Exact-answer accuracy over `indices` (nan when there are none)."""
    if not indices:
        return float("nan")
    model.eval()
    correct = 0.0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        correct += model.loss_and_accuracy(*batcher.batch(chunk))[1].item() * len(chunk)
    model.train()
    return correct / len(indices)


def _save(llava: torch.nn.Module, tokenizer, source: str, output: Path) -> None:
    """The trained model in the source's layout: weights (safetensors), config, tokenizer, and the
    source's image processor config."""
    output.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(output)
    tokenizer.save_pretrained(output)
    source_processor = Path(source) / IMAGE_PROCESSOR_FILE
    if not source_processor.exists():
        raise FileNotFoundError(f"{source}: no {IMAGE_PROCESSOR_FILE} to carry over to {output}")
    shutil.copyfile(source_processor, output / IMAGE_PROCESSOR_FILE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", required=True, help="local LLaVA checkpoint directory to start from")
    parser.add_argument(
        "--pairs", type=Path, required=True, help=f"directory holding {PAIRS_FILE} and its images"
    )
    parser.add_argument("--output", type=Path, required=True, help="where to save the trained checkpoint")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    pretrain_vlm(
        args.backbone,
        read_image_text_pairs(args.pairs),
        args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
