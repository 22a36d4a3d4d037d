"""The installed distribution is discovered by LeRobot with no flag, and with the explicit flag."""

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("*.whl")
    return path


def test_wheel_metadata_keeps_the_underscores(wheel):
    assert wheel.name.startswith("lerobot_policy_llava3d_fusion-")
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
        names = archive.namelist()
    # LeRobot matches the exact prefix "lerobot_policy_" on the metadata name.
    assert "Name: lerobot_policy_llava3d_fusion" in lines
    assert "lerobot_policy_llava3d_fusion/__init__.py" in names
    assert "lerobot_llava3d_fusion/modeling_llava3d_fusion.py" in names


def test_wheel_installs_the_libero_converter_command(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "llava3d-fusion-convert-libero = lerobot_llava3d_fusion.tools.convert_libero:main" in text
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    command = target / "bin" / "llava3d-fusion-convert-libero"
    result = subprocess.run(
        [str(command), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert result.returncode == 0, result.stderr
    assert "--hdf5" in result.stdout and "--replay" in result.stdout and "--drop-noops" in result.stdout


def test_installed_wheel_is_discovered_by_lerobot_without_flags(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = run_python(
        f"""
        from lerobot.utils.import_utils import register_third_party_plugins
        register_third_party_plugins()
        import lerobot_llava3d_fusion
        assert lerobot_llava3d_fusion.__file__.startswith({str(target)!r}), lerobot_llava3d_fusion.__file__
        from lerobot.configs import FeatureType, PolicyFeature, PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors
        config_cls = PreTrainedConfig.get_choice_class("llava3d_fusion")
        assert get_policy_class("llava3d_fusion").__name__ == "Llava3DFusionPolicy"
        config = config_cls(
            vlm_model_name="tiny", device="cpu",
            input_features={{"observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 32, 32))}},
            output_features={{"action": PolicyFeature(FeatureType.ACTION, (2,))}},
        )
        pre, post = make_pre_post_processors(config)
        print("steps:", [type(s).__name__ for s in pre.steps])
        """,
        cwd=tmp_path,
        env_extra={"PYTHONPATH": str(target)},
    )
    assert result.returncode == 0, result.stderr
    assert "Llava3DFusionTokenizerStep" in result.stdout


# lerobot-train with entry-point discovery switched off, so only the flag can load the plugin.
TRAIN_HELP = """
    import sys
    import lerobot.scripts.lerobot_train as train
    train.register_third_party_plugins = lambda: None
    sys.argv = ["lerobot-train", *{flag}, "--policy.type=llava3d_fusion", "--help"]
    assert "lerobot_llava3d_fusion" not in sys.modules
    train.main()
"""


def test_discover_packages_path_flag_loads_the_plugin(tmp_path):
    flag = ["--policy.discover_packages_path=lerobot_llava3d_fusion"]
    result = run_python(TRAIN_HELP.format(flag=flag), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "expert_mode" in result.stdout  # our config's fields are in lerobot-train's help
    # Control: without the flag (and without entry-point discovery) lerobot-train does not know it.
    result = run_python(TRAIN_HELP.format(flag=[]), cwd=tmp_path)
    assert "expert_mode" not in result.stdout
