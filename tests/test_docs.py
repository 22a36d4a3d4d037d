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


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as "-";
    a repeated heading's anchor gets "-1", "-2", ..."""
    anchors: set[str] = set()
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


def test_heading_anchors_follow_github():
    text = "# Ablation: the original system's choices\n## Where `x_y` ends (`z`)\n## Results\n## Results\n```\n# no\n```"
    assert heading_anchors(text) == {"ablation-the-original-systems-choices", "where-x_y-ends-z", "results", "results-1"}


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
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve()
        if not path.exists():
            missing.append(target)
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
            missing.append(target)
    targets = (match.group(1) for match in LINK.finditer(page.read_text()))
    own_anchors = heading_anchors(page.read_text())
    missing += [target for target in targets if target.startswith("#") and target[1:] not in own_anchors]
    assert not missing, f"{page.relative_to(REPO_ROOT)} links to missing files or headings: {missing}"


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
