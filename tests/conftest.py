"""pytest set-up: offline before anything imports LeRobot, one compute thread per test process, and
the shared `policy` fixture."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs one pytest worker per core: a worker's torch ops on more threads than its core,
# and processes it spawns with torch's default (a thread per core), oversubscribe the cores, and
# OpenMP threads that lose their core stall every parallel region (100 training steps of the tiny
# policy beside one busy process: 4.5 s on one thread, 78 s on two).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import tiny_policy  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def policy():
    return tiny_policy()
