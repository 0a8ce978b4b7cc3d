from __future__ import annotations

import os
from pathlib import Path

import pytest

# The test process imports many thread-pool libraries (cv2, onnxruntime, DeepSpeed, gloo) over
# the session; forking DataLoader workers from it can deadlock. Production keeps fork where safe.
os.environ.setdefault("FR_DIST_WORKER_START", "forkserver")
# Triton decides at import whether its own library functions (tl.zeros, tl.sum, ...) are compiled or
# interpreted, so on a machine without CUDA the whole session runs Triton's CPU interpreter from the start:
# whichever test module imports triton first. Heads with kernel=auto stay eager off CUDA, so only the
# kernel's own tests see it; the compile-only test builds its kernel with JITFunction directly.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]

# ---- reference data --------------------------------------------------------------------------
# Every correctness test runs on the copies committed under tests/ (reference vectors made by
# tools/make_reference_vectors.py from OpenSphere's / insightface's code, a RecordIO set written by
# tools/make_test_fixtures.py) and again on ../shared when it is there (vectors and MXNet-written
# bytes made independently). FR_DIST_SHARED_DIR moves ../shared (an empty folder: a bare clone).
SHARED = Path(os.environ.get("FR_DIST_SHARED_DIR") or REPO.parent / "shared")
COMMITTED = {"golden": REPO / "tests" / "golden", "rec": REPO / "tests" / "fixtures" / "rec_fr_dist"}


def _shared_subdir(*parts: str) -> Path:
    d = SHARED.joinpath(*parts)
    if not d.is_dir():
        pytest.skip(f"{d} not found (the ../shared copy beside the repo; the committed copy ran)")
    return d


@pytest.fixture(scope="session", params=["committed", "shared"])
def golden_dir(request) -> Path:
    """tests/golden (always), then ../shared/golden (skips when absent); same archive layout."""
    return COMMITTED["golden"] if request.param == "committed" else _shared_subdir("golden")


@pytest.fixture(scope="session", params=["fr_dist", "mxnet"])
def rec_fixture_dir(request) -> Path:
    """tests/fixtures/rec_fr_dist (fr_dist's writer), then ../shared/fixtures/mxnet_rec (MXNet 1.9.1)."""
    return COMMITTED["rec"] if request.param == "fr_dist" else _shared_subdir("fixtures", "mxnet_rec")


# ---- end of reference data ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_test_backbones_left_registered():
    """Integration tests register a tiny test backbone in-process; keep the registry clean after."""
    yield
    from fr_dist.models import registry

    for name in [n for n in registry._REGISTRY if n.startswith("test_")]:
        del registry._REGISTRY[name]


# ---- a small synthetic RecordIO set for trainer / launcher / fault tests ----------------------------
# One fixture for every test module; a module sets TINY_DATA = dict(...) to change the set's size or seed.
TINY_DATA_DEFAULT = dict(
    num_identities=12, images_per_identity=4, heldout_identities=4, heldout_pairs=8, seed=5
)


@pytest.fixture(scope="module")
def tiny_data(request, tmp_path_factory) -> Path:
    """A synthetic RecordIO set (train.rec/.idx, heldout.bin) in a temp folder, one per test module."""
    from fr_dist.data import make_synthetic_dataset

    kw = dict(TINY_DATA_DEFAULT, **getattr(request.module, "TINY_DATA", {}))
    out = tmp_path_factory.mktemp(f"syn_{request.module.__name__.rsplit('.', 1)[-1]}")
    make_synthetic_dataset(out, **kw)
    return out


@pytest.fixture
def f64():
    """float64 as the default dtype for the test (the exactness tests), float32 again after it."""
    import torch  # not at the top: TRITON_INTERPRET above is set before anything imports triton

    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)
