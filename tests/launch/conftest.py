"""Shared pieces of the launch tests: a tiny synthetic dataset and the demo recipe shrunk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # netns.py, slurm_cluster.py, launch_util.py


@pytest.fixture(scope="session")
def launch_data(tmp_path_factory) -> Path:
    from fr_dist.data import make_synthetic_dataset

    out = tmp_path_factory.mktemp("launch_syn")
    make_synthetic_dataset(
        out, num_identities=32, images_per_identity=8, heldout_identities=8, heldout_pairs=16, seed=3
    )
    return out
