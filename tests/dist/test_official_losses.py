"""The five losses of issue 18 on fr_dist's sharded heads == their authors' own code on the global batch.

tests/golden/<loss>_official.npz (tools/make_loss_vectors.py: the official code run in float64) replayed on
W = 1, 2, 3, 4 gloo ranks: K = 29 (uneven shards) on every W, K = 3 on W = 4 (an empty shard); two
consecutive batches on one head (stateful losses carry their statistics). Loss, dL/dx of the raw
embeddings, dL/dW (and dL/db) within 1e-6 relative; state buffers identical on every rank and equal to
the official module's. Plus the collectives each loss sends (fr_dist.comm counters).
"""

from __future__ import annotations

import os

import pytest
import torch
from official import available, batches, build_head, check_replay, close, load, replay

from fr_dist.testing import spawn_gloo

pytestmark = pytest.mark.dist

LOSSES = [n for n in available() if os.environ.get("FR_DIST_OFFICIAL_ONLY", n) == n]

# all-reduces of B-length ([N]) vectors each loss sends (name -> calls), beside the packed gather and the
# reduce-scatter every head sends; binary losses: only scalars (loss value, bias gradient)
SOFTMAX = {"softmax_max": 1, "softmax_sum": 1, "softmax_target": 1}
N_LENGTH_ALL_REDUCES = {
    "sphereface": SOFTMAX,
    "adaface": SOFTMAX,
    "magface": SOFTMAX,
    "curricularface": {**SOFTMAX, "curricular_target": 1},
    "uniface": {},
}


def _rank(rank, world, jobs):
    torch.set_default_dtype(torch.float64)
    out = {}
    for name, case in jobs:
        arrays, meta = load(name)
        out[(name, case)] = replay(rank, world, name, case, arrays, meta)
    return out


def _jobs(world):
    cases = ["k29"] + (["k3"] if world == 4 else [])
    return [(n, c) for n in LOSSES for c in cases]


@pytest.mark.skipif(not LOSSES, reason="no tests/golden/*_official.npz")
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_equals_official(world):
    jobs = _jobs(world)
    results = spawn_gloo(_rank, world, args=(jobs,))
    for name, case in jobs:
        arrays, meta = load(name)
        per_rank = [results[r][(name, case)] for r in range(world)]
        K = arrays[f"{case}/W"].shape[0]
        if K < world:
            assert per_rank[-1][0]["num_local"] == 0
        check_replay(per_rank, arrays, meta, case, f"{name} {case} W={world}")
        if world > 1:
            for t in range(batches(meta, case)):
                _check_comm(
                    name,
                    per_rank[0][t]["stats"],
                    world,
                    arrays[f"{case}/x0"].shape,
                    f"{name} {case} batch {t}",
                )


def _check_comm(name, st, world, shape, tag):
    N, D = shape
    assert st["all_gather/embeddings"]["calls"] == 1, tag  # embeddings + labels, one packed gather
    assert st["reduce_scatter"]["calls"] == 1 and st["reduce_scatter"]["bytes"] == N * D * 8, tag
    want = N_LENGTH_ALL_REDUCES[name]
    got = {
        k.split("/", 1)[1]: v for k, v in st.items() if k.startswith("all_reduce/") and v["bytes"] >= N * 8
    }
    assert {k: v["calls"] for k, v in got.items()} == want, f"{tag}: [N] all-reduces {got}"
    small = st["all_reduce"]["bytes"] - sum(v["bytes"] for v in got.values())
    assert small <= 2 * 8, f"{tag}: scalar all-reduces carry {small} bytes"


def _resume_rank(rank, world, name, case, shards):
    torch.set_default_dtype(torch.float64)
    arrays, meta = load(name)
    head = build_head(name, meta, arrays, case)
    head.load_resharded(shards)
    return {k: v.clone() for k, v in head.state_buffers().items()}


STATEFUL = [n for n in LOSSES if any("/state" in k for k in load(n)[0])] if LOSSES else []


@pytest.mark.skipif(not STATEFUL, reason="no stateful loss has an official archive")
@pytest.mark.parametrize("name", STATEFUL)
def test_state_is_checkpointed_and_resharded(name):
    """A stateful loss's statistics after two batches on W = 2 come back on every rank of W = 3 (and 1)."""
    arrays, meta = load(name)
    last = meta["cases"]["k29"]["batches"] - 1
    run = spawn_gloo(_rank, 2, args=([(name, "k29")],))
    shards = [run[r][(name, "k29")][-1]["shard"] for r in range(2)]
    prefix = f"k29/state{last}/"
    for world in (3, 1):
        states = spawn_gloo(_resume_rank, world, args=(name, "k29", shards))
        for r, st in enumerate(states):
            assert {prefix + k for k in st} == {k for k in arrays if k.startswith(prefix)}
            for k, v in st.items():
                close(
                    v.reshape(-1), arrays[prefix + k].reshape(-1), f"{name} {k} after 2 -> {world} (rank {r})"
                )
