"""pytest set-up: offline before anything imports LeRobot, and the shared `policy` fixture."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from helpers import tiny_policy  # noqa: E402


@pytest.fixture
def policy():
    return tiny_policy()
