"""The wheel: discovered by LeRobot with no flag and with the explicit flag, and run alone (presets, demo)."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import e2e_utils as e2e
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


@pytest.fixture(scope="module")
def installed_wheel(wheel, tmp_path_factory) -> Path:
    """The wheel installed (without dependencies: those of the test environment serve) into a folder
    that goes first on PYTHONPATH, ahead of the checkout's editable install."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


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


def test_wheel_installs_the_libero_converter_command(wheel, installed_wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "llava3d-fusion-convert-libero = lerobot_llava3d_fusion.tools.convert_libero:main" in text
    target = installed_wheel
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


def test_installed_wheel_is_discovered_by_lerobot_without_flags(installed_wheel, tmp_path):
    target = installed_wheel
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


# ---- The installed wheel alone, outside the checkout: presets, the demo ---------------------------------


def run_installed(
    target: Path, command: list[str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`command` with only the installed wheel's folder on PYTHONPATH, run from `cwd` (not the checkout)."""
    return subprocess.run(
        command,
        check=False,
        cwd=cwd,
        env=e2e.subprocess_env(PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# What a user of the installed wheel types, in one process (each new one pays torch's import again):
# the preset command's `main`, and `python -m` of the demo and the ablation (`runpy`, as `-m` does).
INSTALLED_COMMANDS = """
    import contextlib, io, json, runpy, sys
    import lerobot_llava3d_fusion
    from lerobot_llava3d_fusion.presets import main as preset_main

    def run(function, *args):
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                function(*args)
            except SystemExit as exit:
                code = exit.code
        return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

    def module_help(module):
        sys.argv = [module, "--help"]
        return run(runpy.run_module, module, None, "__main__", True)

    print(json.dumps({
        "package": lerobot_llava3d_fusion.__file__,
        "presets": run(preset_main, []),
        "libero": run(preset_main, ["libero"]),
        "unknown": run(preset_main, ["no_such_preset"]),
        "demo": module_help("lerobot_llava3d_fusion.demo"),
        "ablation": module_help("lerobot_llava3d_fusion.demo.ablation"),
    }))
"""


def test_installed_wheel_ships_the_presets_and_runs_the_demo_help(wheel, installed_wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    presets = (REPO / "lerobot_llava3d_fusion" / "presets").glob("*.json")
    shipped = {f"lerobot_llava3d_fusion/presets/{path.name}" for path in presets}
    assert shipped and shipped <= names, shipped - names
    assert "lerobot_llava3d_fusion/model_card_template.md" in names
    assert "llava3d-fusion-preset = lerobot_llava3d_fusion.presets:main" in scripts

    command = [sys.executable, "-c", textwrap.dedent(INSTALLED_COMMANDS)]
    result = run_installed(installed_wheel, command, tmp_path)
    assert result.returncode == 0, result.stderr
    ran = json.loads(result.stdout.splitlines()[-1])
    assert Path(ran["package"]).is_relative_to(installed_wheel), ran["package"]  # not the checkout
    assert ran["presets"]["code"] == 0
    assert {"libero", "touch_block_demo"} <= set(ran["presets"]["out"].split())
    preset = Path(ran["libero"]["out"].strip())
    assert preset.is_relative_to(installed_wheel), preset
    assert json.loads(preset.read_text())["policy"]["type"] == "llava3d_fusion"
    assert ran["unknown"]["code"] != 0 and "no_such_preset" in ran["unknown"]["err"]
    for module in ("demo", "ablation"):
        assert ran[module]["code"] == 0 and "--workdir" in ran[module]["out"], ran[module]


@pytest.mark.slow
def test_installed_wheel_runs_a_short_demo_outside_the_checkout(installed_wheel, tmp_path):
    """The whole demo (dataset, lerobot-train with the shipped preset, lerobot-eval), shrunk to minutes."""
    workdir = tmp_path / "demo"
    command = [
        sys.executable, "-m", "lerobot_llava3d_fusion.demo", "--workdir", str(workdir),
        "--episodes", "4", "--steps", "2", "--batch-size", "2", "--eval-episodes", "1",
    ]  # fmt: skip
    result = run_installed(installed_wheel, command, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (results,) = workdir.glob("*/results.json")
    summary = json.loads(results.read_text())
    assert summary["train_batch_size"] == 2
    # lerobot-train and lerobot-eval ran from the wheel too: its files, under the workdir only.
    (config,) = workdir.glob("**/checkpoints/last/pretrained_model/config.json")
    assert json.loads(config.read_text())["type"] == "llava3d_fusion"
