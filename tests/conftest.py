from __future__ import annotations

import os
from pathlib import Path

import pytest

# The test process imports many thread-pool libraries (cv2, onnxruntime, DeepSpeed, gloo) over
# the session; forking DataLoader workers from it can deadlock. Production keeps fork where safe.
os.environ.setdefault("FR_DIST_WORKER_START", "forkserver")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared material not found at {SHARED} (clone with ../shared beside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def golden_dir(shared_dir) -> Path:
    d = shared_dir / "golden"
    if not d.is_dir():
        pytest.skip(f"golden vectors not found at {d}")
    return d


@pytest.fixture(scope="session")
def mxnet_fixture_dir(shared_dir) -> Path:
    d = shared_dir / "fixtures" / "mxnet_rec"
    if not d.is_dir():
        pytest.skip(f"MXNet RecordIO fixture not found at {d}")
    return d


@pytest.fixture(autouse=True)
def _no_test_backbones_left_registered():
    """Integration tests register a tiny test backbone in-process; keep the registry clean after."""
    yield
    from fr_dist.models import registry

    for name in [n for n in registry._REGISTRY if n.startswith("test_")]:
        del registry._REGISTRY[name]
