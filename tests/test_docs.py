"""The README and docs/ pages stay true to the package: length, links, flags and commands."""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
from lerobot.envs.configs import EnvConfig

import lerobot_llava3d_fusion  # noqa: F401  (registers the policy and the env types)
from lerobot_llava3d_fusion import Llava3DFusionConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
PAGES = [README, REPO_ROOT / "bench" / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
POLICY_FLAG = re.compile(r"--policy\.([A-Za-z_]\w*)")
ENV_FLAG = re.compile(r"--env\.([A-Za-z_]\w*)")
CONSOLE_SCRIPT = re.compile(r"\bllava3d-fusion-[a-z][a-z-]*[a-z]")
# `--policy.X` handled by LeRobot's own parser rather than by the config's fields.
LEROBOT_POLICY_ARGUMENTS = {"path", "type", "discover_packages_path"}


def page_ids(pages: list[Path]) -> list[str]:
    return [page.relative_to(REPO_ROOT).as_posix() for page in pages]


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (no URL scheme, no pure in-page anchor)."""
    targets = (match.group(1) for match in LINK.finditer(text))
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]


def test_readme_is_an_entry_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"


def test_relative_link_parser_keeps_only_repository_targets():
    text = "[a](docs/a.md#x) ![b](docs/b.png) [c](https://x.org/y) [d](#local) [e](mailto:me@x.org)"
    assert relative_links(text) == ["docs/a.md#x", "docs/b.png"]


@pytest.mark.parametrize("page", PAGES, ids=page_ids(PAGES))
def test_every_relative_link_points_to_an_existing_file(page):
    missing = []
    for target in relative_links(page.read_text()):
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO_ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_ids(PAGES))
def test_every_policy_flag_is_a_config_field(page):
    fields = {field.name for field in dataclasses.fields(Llava3DFusionConfig)} | LEROBOT_POLICY_ARGUMENTS
    unknown = sorted(set(POLICY_FLAG.findall(page.read_text())) - fields)
    assert not unknown, f"{page.relative_to(REPO_ROOT)} names --policy.<field> flags Llava3DFusionConfig lacks: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=page_ids(PAGES))
def test_every_env_flag_is_a_field_of_a_registered_env(page):
    fields = {"type"}
    for name in EnvConfig.get_known_choices():
        fields |= {field.name for field in dataclasses.fields(EnvConfig.get_choice_class(name))}
    unknown = sorted(set(ENV_FLAG.findall(page.read_text())) - fields)
    assert not unknown, f"{page.relative_to(REPO_ROOT)} names --env.<field> flags no registered env has: {unknown}"


def test_env_flags_check_the_package_envs():
    """The env check sees this package's env types, so their own fields count as known."""
    known = EnvConfig.get_known_choices()
    assert {"touch_block", "libero_rgbd", "libero"} <= set(known)
    touch_block_fields = {field.name for field in dataclasses.fields(EnvConfig.get_choice_class("touch_block"))}
    assert {"num_blocks", "instruction_perturbation", "success_target"} <= touch_block_fields


@pytest.mark.parametrize("page", PAGES, ids=page_ids(PAGES))
def test_every_console_script_named_exists(page):
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    unknown = sorted(set(CONSOLE_SCRIPT.findall(page.read_text())) - set(scripts))
    assert not unknown, f"{page.relative_to(REPO_ROOT)} names commands pyproject.toml does not install: {unknown}"


def test_readme_keeps_the_commands_users_and_ci_type():
    text = README.read_text()
    head = "\n".join(text.splitlines()[:100])
    assert "make test" in text, "CI (.ci/run) runs the README's test command, `make test`"
    assert "make demo" in text
    assert re.search(r"lerobot-train .*\\\n\s*--dataset\.repo_id=<your dataset>", head), (
        "the first 100 lines must show lerobot-train on the user's own dataset"
    )
