"""Shared fixtures: one local Ray cluster per test run, offline Hugging Face, loopback only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real math data (GSM8K, MATH, ProcessBench); tests that need it skip without it."""
    from mathprm.problems import data_dir as find

    try:
        return find()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test of the run (starting one costs ~10 s)."""
    import ray

    from mathprm.ray_utils import init_ray

    info = init_ray(num_cpus=2)
    yield info
    ray.shutdown()
