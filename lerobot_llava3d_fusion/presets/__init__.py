"""Training presets shipped with the package (`lerobot-train --config_path=...`).

Each ``<name>.json`` here is a complete `lerobot-train` configuration; :func:`preset_path` gives its
path in the installed package, and ``llava3d-fusion-preset <name>`` prints it for a shell command.
"""

from __future__ import annotations

import argparse
from importlib.resources import as_file, files
from pathlib import Path


def preset_names() -> list[str]:
    """Names of the shipped presets, without the ``.json`` suffix."""
    return sorted(entry.name.removesuffix(".json") for entry in files(__name__).iterdir() if entry.name.endswith(".json"))


def preset_path(name: str) -> Path:
    """Path of the shipped preset ``name`` (e.g. ``"libero"``); a clear error for an unknown name."""
    resource = files(__name__) / f"{name.removesuffix('.json')}.json"
    if not resource.is_file():
        raise ValueError(f"unknown preset {name!r}; the package ships {preset_names()}")
    with as_file(resource) as path:  # a real file for an installed wheel or a checkout
        return Path(path)


def main(argv: list[str] | None = None) -> None:
    """Print the path of a shipped preset, for ``lerobot-train --config_path=$(llava3d-fusion-preset NAME)``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(preset_names())}")
    args = parser.parse_args(argv)
    if args.name is None:
        print("\n".join(preset_names()))
        return
    try:
        print(preset_path(args.name))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
