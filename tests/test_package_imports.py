"""Importing the package's modules has no side effects on disk, and its modules import no cycle.

Registration of the policy and env types happens at import (LeRobot's plugin discovery imports the
package before every script); anything else (LIBERO's config file and asset link, simulators) waits
until it is used.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import lerobot_llava3d_fusion

PACKAGE_DIR = Path(lerobot_llava3d_fusion.__file__).parent
REPO_ROOT = PACKAGE_DIR.parent
PACKAGES = ("lerobot_llava3d_fusion", "lerobot_policy_llava3d_fusion")

IMPORT_EVERYTHING = """
import importlib, json, os, pkgutil, sys
names = []
for package in sys.argv[1:]:
    module = importlib.import_module(package)
    names += [package, *(info.name for info in pkgutil.walk_packages(module.__path__, package + "."))]
for name in names:
    importlib.import_module(name)
simulators = sorted({m.split(".")[0] for m in sys.modules} & {"libero", "robosuite", "mujoco"})
print(json.dumps({"modules": len(names), "simulators": simulators, "MUJOCO_GL": os.environ.get("MUJOCO_GL")}))
"""


def module_names() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package and the discovery shim."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports, at module level or inside functions alike.

    Its own parent packages are left out: Python initialises them before the module anyway; so are
    imports under ``if TYPE_CHECKING:``, which never run.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    tree = ast.parse(path.read_text())
    type_checking_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    targets = set()
    for node in ast.walk(tree):
        if id(node) in type_checking_only:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {target for target in targets if target in modules and target != name} - ancestors


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return stack[stack.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_importing_every_module_writes_nothing_and_loads_no_simulator(tmp_path):
    home, libero_config, work = tmp_path / "home", tmp_path / "libero", tmp_path / "cwd"
    for folder in (home, work):
        folder.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "MUJOCO_GL"}
    env.update(
        HOME=str(home),
        LIBERO_CONFIG_PATH=str(libero_config),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        PYTHONDONTWRITEBYTECODE="1",
    )
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING, *PACKAGES],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["cwd", "home"], f"importing the package wrote {written}"
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["modules"] == len(module_names())
    assert report["simulators"] == [], f"importing the package imported {report['simulators']}"
    assert report["MUJOCO_GL"] is None, "importing the package set MUJOCO_GL"


def test_the_package_has_no_import_cycle():
    modules = module_names()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["lerobot_llava3d_fusion.envs.libero_rgbd"] >= {"lerobot_llava3d_fusion.envs.libero_rgbd_sim"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


HARNESS_PACKAGES = ("lerobot_llava3d_fusion.demo", "lerobot_llava3d_fusion.tools")

BUILD_THROUGH_LEROBOT = """
import json, sys
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors
from lerobot.utils.import_utils import register_third_party_plugins

register_third_party_plugins()
config = make_policy_config(
    "llava3d_fusion",
    vlm_model_name="tiny",
    input_features={
        "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
        "observation.state": PolicyFeature(FeatureType.STATE, (4,)),
    },
    output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
    device="cpu",
)
policy = get_policy_class(config.type)(config)
make_pre_post_processors(config, dataset_stats=None)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("lerobot_llava3d_fusion"))))
"""


def test_building_the_policy_through_lerobot_loads_no_harness_module(tmp_path):
    """LeRobot's plugin discovery and factory load the contract, the network and the env registration:
    no demo, ablation, pretraining, converter, recorder or other command-line tool."""
    result = subprocess.run(
        [sys.executable, "-c", BUILD_THROUGH_LEROBOT],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert "lerobot_llava3d_fusion.modeling_llava3d_fusion" in loaded
    assert "lerobot_llava3d_fusion.model.network" in loaded
    harness = [name for name in loaded if name.startswith(HARNESS_PACKAGES)]
    assert harness == [], f"building the policy loaded {harness}"


def test_no_environment_or_network_module_imports_the_harness():
    """Environments and the policy's own modules never depend on the demo or the data tools (the LIBERO
    set-up, which the LIBERO environment needs to start its simulator, is the one tool they may use)."""
    modules = module_names()
    allowed = {"lerobot_llava3d_fusion.tools.libero_setup"}
    offenders = {
        name: sorted(target for target in imported_modules(name, path, modules) if target.startswith(HARNESS_PACKAGES))
        for name, path in modules.items()
        if not name.startswith(HARNESS_PACKAGES)
    }
    offenders = {name: [t for t in targets if t not in allowed] for name, targets in offenders.items()}
    assert {name: targets for name, targets in offenders.items() if targets} == {}
