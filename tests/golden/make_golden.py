"""Writes the golden tiny checkpoint and its expected outputs (`tests/test_golden.py` compares).

Run only when a change of numbers is intended, and say why in the commit:
    HF_HUB_OFFLINE=1 python tests/golden/make_golden.py
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_case import CHECKPOINT, OUTPUTS, golden_inputs, golden_policy  # noqa: E402


def main() -> None:
    policy = golden_policy()
    policy.save_pretrained(HERE / CHECKPOINT)
    batch, noise, time = golden_inputs(policy)
    policy.eval()
    actions = policy.predict_action_chunk(batch, noise=noise)
    loss, _ = policy.forward(batch, noise=noise, time=time, reduction="none")
    save_file(
        {
            "actions": actions.contiguous(),
            "loss": loss.detach().contiguous(),
            "noise": noise.contiguous(),
            "time": time.contiguous(),
        },
        HERE / OUTPUTS,
    )


if __name__ == "__main__":
    main()
