"""The wheel: discovered by LeRobot with no flag and with the explicit flag, and run alone (presets, demo)
from a virtual environment of its own; the package imports only what it declares."""

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import e2e_utils as e2e
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DISTRIBUTION = PYPROJECT["project"]["name"]
PACKAGES = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]


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


@dataclass(frozen=True)
class FreshVenv:
    """A virtual environment with the wheel installed by pip, as a user installs it."""

    root: Path
    python: Path
    bin: Path
    site_packages: Path

    def env(self) -> dict[str, str]:
        """The scripts' environment (offline, one thread per op), activated: nothing on PYTHONPATH."""
        env = e2e.subprocess_env(VIRTUAL_ENV=str(self.root), PIP_DISABLE_PIP_VERSION_CHECK="1")
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, command: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        """`command` in this environment, run from `cwd` (never the checkout)."""
        assert not Path(cwd).resolve().is_relative_to(REPO), cwd
        return subprocess.run(
            [str(part) for part in command],
            check=False,
            cwd=cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
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


def is_this_project(name: str) -> bool:
    """Whether a site-packages entry belongs to this project's own install (dist-info, editable .pth and
    finder, packages)."""
    return any(part in name for part in (DISTRIBUTION, *PACKAGES))


@pytest.fixture(scope="module")
def installed_wheel(wheel, tmp_path_factory) -> FreshVenv:
    """A new venv with the wheel installed by `pip install --no-deps`. The dependencies are the test
    environment's, not reinstalled: a .pth file adds a folder of links to its site-packages that leaves out
    this project's own (editable) install, so nothing resolves to the checkout and pip sees only the wheel's
    distribution."""
    root = tmp_path_factory.mktemp("venv")
    # pip, like the other dependencies, is the test environment's.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(root)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    python = root / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(
        subprocess.run([python, "-c", purelib], check=True, capture_output=True, text=True).stdout.strip()
    )
    assert site_packages.is_relative_to(root), site_packages
    dependencies = tmp_path_factory.mktemp("dependencies")
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not is_this_project(entry.name):
            (dependencies / entry.name).symlink_to(entry)
    # addsitedir, not a plain path line: the dependencies' own .pth files are processed as in their venv.
    (site_packages / "dependencies.pth").write_text(f"import site; site.addsitedir({str(dependencies)!r})\n")

    venv = FreshVenv(root, python, root / "bin", site_packages)
    install = venv.run([python, "-m", "pip", "install", "--no-deps", wheel], cwd=root)
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


# ---- What the package imports is what it declares ------------------------------------------------------

def imported_modules(packages: Iterable[Path]) -> dict[str, set[str]]:
    """The top-level module of every absolute import in `packages` (in functions too) -> the files."""
    found: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted(package.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.partition(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def requirement_closure(requirements: Iterable[str]) -> set[str]:
    """The canonical names of the distributions `requirements` bring in: each one, then what its installed
    metadata requires (with the extras asked for, markers evaluated here), recursively."""
    names: set[str] = set()
    expanded: set[tuple[str, str]] = set()
    pending = [(Requirement(text), "") for text in requirements]
    while pending:
        requirement, asked_extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": asked_extra}):
            continue
        name = canonicalize_name(requirement.name)
        names.add(name)
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) in expanded:
                continue
            expanded.add((name, extra))
            try:
                requires = importlib.metadata.requires(name) or []
            except importlib.metadata.PackageNotFoundError:
                continue  # not installed here: its name is known, not what it requires
            pending += [(Requirement(text), extra) for text in requires]
    return names


def test_every_third_party_import_of_the_package_is_declared():
    """Each third-party module the package imports comes from a distribution that `dependencies` brings
    (directly or through what those require), or, for optional features, that a declared extra brings
    (the `test` extra serves the test suite, not the package)."""
    project = PYPROJECT["project"]
    base = requirement_closure(project["dependencies"])
    extras = {
        extra: requirement_closure(requirements)
        for extra, requirements in project["optional-dependencies"].items()
        if extra != "test"
    }
    modules = imported_modules(REPO / package for package in PACKAGES)
    assert {"torch", "transformers", "lerobot", "matplotlib"} <= set(modules)  # imports in functions too
    distributions_of = importlib.metadata.packages_distributions()
    own = set(PACKAGES)
    undeclared = {}
    for module, files in sorted(modules.items()):
        if module in sys.stdlib_module_names or module in own:
            continue
        # Not installed here: named as its distribution would most likely be.
        distributions = {canonicalize_name(d) for d in distributions_of.get(module, [module])}
        if distributions & base or any(distributions & closure for closure in extras.values()):
            continue
        undeclared[module] = {"distributions": sorted(distributions), "imported in": sorted(files)}
    assert not undeclared, f"imported, not declared in pyproject.toml: {json.dumps(undeclared, indent=1)}"


# ---- The wheel ---------------------------------------------------------------------------------------


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


def test_wheel_installs_its_commands_into_the_venv(wheel, installed_wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "llava3d-fusion-convert-libero = lerobot_llava3d_fusion.tools.convert_libero:main" in text
    venv = installed_wheel
    for name in PYPROJECT["project"]["scripts"]:
        command = venv.bin / name
        assert command.is_file() and os.access(command, os.X_OK), command
        assert command.read_text().splitlines()[0] == f"#!{venv.python}", command  # the venv's python
    result = venv.run([venv.bin / "llava3d-fusion-convert-libero", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--hdf5" in result.stdout and "--replay" in result.stdout and "--drop-noops" in result.stdout


def test_installed_wheel_has_every_requirement(installed_wheel, tmp_path):
    """pip check in the venv: the wheel's metadata asks for nothing the environment lacks."""
    venv = installed_wheel
    result = venv.run([venv.python, "-m", "pip", "check"], cwd=tmp_path)
    report = result.stdout + result.stderr
    ours = canonicalize_name(DISTRIBUTION)
    problems = [line for line in report.splitlines() if line and canonicalize_name(line.split()[0]) == ours]
    assert not problems, report
    shown = venv.run([venv.python, "-m", "pip", "show", DISTRIBUTION], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"Location: {venv.site_packages}" in shown.stdout.splitlines(), shown.stdout


def test_installed_wheel_is_discovered_by_lerobot_without_flags(installed_wheel, tmp_path):
    venv = installed_wheel
    code = f"""
        from lerobot.utils.import_utils import register_third_party_plugins
        register_third_party_plugins()
        import lerobot_llava3d_fusion
        assert lerobot_llava3d_fusion.__file__.startswith({str(venv.site_packages)!r}), lerobot_llava3d_fusion.__file__
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
    """
    result = venv.run([venv.python, "-c", textwrap.dedent(code)], cwd=tmp_path)
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


# What a user of the installed wheel types, in one process (each new one pays torch's import again):
# the preset command's `main`, and `python -m` of the demo and the ablation (`runpy`, as `-m` does).
INSTALLED_COMMANDS = """
    import contextlib, io, json, os, runpy, sys
    from importlib import metadata
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
        "distribution": str(metadata.distribution("lerobot_policy_llava3d_fusion").locate_file("")),
        "path": [os.path.abspath(entry) for entry in sys.path],
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

    venv = installed_wheel
    result = venv.run([venv.python, "-c", textwrap.dedent(INSTALLED_COMMANDS)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ran = json.loads(result.stdout.splitlines()[-1])
    assert Path(ran["package"]).is_relative_to(venv.site_packages), ran["package"]  # not the checkout
    assert Path(ran["distribution"]) == venv.site_packages, ran["distribution"]
    assert not any(Path(entry).resolve().is_relative_to(REPO) for entry in ran["path"]), ran["path"]
    assert ran["presets"]["code"] == 0
    assert {"libero", "touch_block_demo"} <= set(ran["presets"]["out"].split())
    preset = Path(ran["libero"]["out"].strip())
    assert preset.is_relative_to(venv.site_packages), preset
    assert json.loads(preset.read_text())["policy"]["type"] == "llava3d_fusion"
    assert ran["unknown"]["code"] != 0 and "no_such_preset" in ran["unknown"]["err"]
    for module in ("demo", "ablation"):
        assert ran[module]["code"] == 0 and "--workdir" in ran[module]["out"], ran[module]


@pytest.mark.slow
def test_installed_wheel_runs_a_short_demo_outside_the_checkout(installed_wheel, tmp_path):
    """The whole demo (dataset, lerobot-train with the shipped preset, lerobot-eval), shrunk to minutes."""
    venv = installed_wheel
    workdir = tmp_path / "demo"
    command = [
        venv.python, "-m", "lerobot_llava3d_fusion.demo", "--workdir", workdir,
        "--episodes", "4", "--steps", "2", "--batch-size", "2", "--eval-episodes", "1",
    ]  # fmt: skip
    result = venv.run(command, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (results,) = workdir.glob("*/results.json")
    summary = json.loads(results.read_text())
    assert summary["train_batch_size"] == 2
    # lerobot-train and lerobot-eval ran from the wheel too: its files, under the workdir only.
    (config,) = workdir.glob("**/checkpoints/last/pretrained_model/config.json")
    assert json.loads(config.read_text())["type"] == "llava3d_fusion"
