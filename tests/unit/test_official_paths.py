"""Every loss with an official archive (tests/golden/<loss>_official.npz) on each of its family's other paths,
one process: the softmax family's chunked online softmax, the binary family's fused pass at several chunk
sizes and its materialised block path; every case of the archive, its variants included (MagFace without
easy margin). tests/dist/test_official_losses.py replays the recipes' default path on W = 1..4."""

from __future__ import annotations

import pytest
import torch
from official import available, build_head, cases, check_replay, load, replay

from fr_dist.heads.registry import head_class
from fr_dist.heads.softmax import SoftmaxHead

PATHS = {
    "softmax": [dict(chunk_size=3), dict(chunk_size=1000)],
    "binary": [dict(chunk_size=1), dict(chunk_size=5), dict(chunk_size=1000), dict(fused=False)],
}


def _jobs():
    for name in available():
        family = "softmax" if issubclass(head_class(name), SoftmaxHead) else "binary"
        for case in cases(load(name)[1]):
            for opts in PATHS[family]:
                yield pytest.param(
                    name, case, opts, id=f"{name}-{case}-" + ",".join(f"{k}={v}" for k, v in opts.items())
                )


@pytest.mark.skipif(not available(), reason="no tests/golden/*_official.npz")
@pytest.mark.parametrize("name,case,opts", list(_jobs()))
def test_official_vectors_on_every_path(name, case, opts, f64):
    arrays, meta = load(name)
    meta = dict(meta, hp={**meta["hp"], **cases(meta)[case], **opts})
    per_rank = [replay(0, 1, name, case, arrays, meta)]
    check_replay(per_rank, arrays, meta, case, f"{name} {case} {opts}")
    if name == "uniface":  # UniFace normalises differentiably: its rows are never re-projected in place
        head = build_head(name, meta, arrays, case)
        head(arrays[f"{case}/x0"], arrays[f"{case}/y0"]).backward()
        assert torch.equal(head.weight.detach(), arrays[f"{case}/W"])
