"""bench/latency.py at its `tiny` preset, as a script: the benches' model building (a LLaVA checkpoint
directory written on the fly, ours and, where the installed transformers allows it, LeRobot's pi0 at
the same sizes, both described from their modules), their inputs, timing and output run end to end,
offline, on a CPU. Marked transformers_range: `make test-latest` runs it on the newest transformers
the package allows too, where pi0 is left out."""

import importlib.metadata
import json
import sys
from pathlib import Path

import e2e_utils as e2e
import pytest
from packaging.requirements import Requirement

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "latency.py"


def lerobot_pi0_runs() -> bool:
    """Whether the installed transformers is in the range LeRobot's `transformers-dep` extra pins."""
    installed = importlib.metadata.version("transformers")
    for line in importlib.metadata.requires("lerobot") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if requirement.name == "transformers" and marker and marker.evaluate({"extra": "transformers-dep"}):
            return requirement.specifier.contains(installed, prereleases=True)
    return True


@pytest.mark.transformers_range
def test_latency_bench_runs_at_the_tiny_preset(tmp_path):
    out = tmp_path / "latency.json"
    args = ["--preset", "tiny", "--threads", "1", "--warmup", "1", "--reps", "2", "--out", str(out)]
    result = e2e.run_command([sys.executable, str(SCRIPT), *args], tmp_path / "latency.log", timeout=120)
    assert result.returncode == 0, result.describe()

    pi0 = lerobot_pi0_runs()
    variants = ["ours use_cache=true", "ours use_cache=false", *(["pi0"] if pi0 else [])]
    if not pi0:
        assert "pi0 left out: LeRobot's pi0 needs transformers" in result.stdout, result.describe()
    table = result.stdout.split("predict_action_chunk seconds", 1)[-1]
    for variant in variants:
        assert f"\n  {variant} " in table, result.describe()

    payload = json.loads(out.read_text())
    assert payload["info"]["preset"] == "tiny"
    assert set(payload["results"]) == set(variants)
    for timing in payload["results"].values():
        assert timing["n"] == 2 and timing["median"] > 0
    assert set(payload["models"]) == ({"ours", "pi0"} if pi0 else {"ours"})
    tiny = payload["info"]["sizes"]
    for described in payload["models"].values():  # read off the built modules
        assert described["vision"] == tiny["vision"]
        for part in ("llm", "expert"):
            assert {key: described[part][key] for key in tiny[part]} == tiny[part]
        assert described["vocab_size"] == tiny["vocab_size"]
    targets = {"nocache_over_cache_latency", *(["ours_over_pi0_latency"] if pi0 else [])}
    assert set(payload["targets"]) == targets
