"""In-training verification on insightface ``.bin`` pair files (every ``eval.every`` steps).

Every rank embeds a slice of each set and the embeddings are all-gathered, so no rank idles
and no collective times out. The pair images are decoded once and kept in memory. When the
mean accuracy improves, rank 0 keeps the backbone in ``RUN/best/backbone.pt`` with the results.
With ``eval.plot_dir`` (relative to the run directory), rank 0 also writes each set's ROC there after
every verification (``<set>_roc.png`` + ``<set>_roc.json``; the last verification's stay).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fr_dist import comm
from fr_dist.errors import ConfigError
from fr_dist.eval.plot import require_matplotlib, write_roc
from fr_dist.eval.verification import embed_images, evaluate_pairs, l2_normalize, load_bin

__all__ = ["VerificationCallback"]


class VerificationCallback:
    """``callback(backbone, best) -> ({set_name: {accuracy, accuracy_std, threshold, ...}}, best)``
    (flip protocol). ``best`` (the caller owns it and checkpoints it): the best mean accuracy so far;
    RUN/best is replaced only by a better model, and the returned best is then its accuracy."""

    def __init__(self, eval_cfg, device: torch.device, output_dir, group=None):
        self.cfg, self.device, self.out = eval_cfg, device, Path(output_dir)
        self.group = comm.resolve_group(group)
        self.rank, self.world = comm.world_info(self.group)
        plot_dir = getattr(eval_cfg, "plot_dir", None)  # RUN-relative; None / "" = no figures
        self.plot_dir = (self.out / plot_dir) if plot_dir else None
        if self.plot_dir is not None:
            try:
                require_matplotlib()
            except ImportError as e:  # at start-up, not after the training
                raise ConfigError(f"eval.plot_dir={plot_dir}: {e}") from None
        self.sets = {Path(p).stem: load_bin(p) for p in eval_cfg.bins}  # name -> (images, issame)

    @torch.no_grad()
    def __call__(self, backbone, best: float = -1.0) -> tuple[dict, float]:
        was_training = backbone.training
        backbone.eval()
        results = {}
        for name, (images, issame) in self.sets.items():
            noflip, flipsum = embed_images(
                backbone,
                images,
                batch_size=self.cfg.batch_size,
                device=self.device,
                flip=self.cfg.flip,
                rank=self.rank,
                world_size=self.world,
                group=self.group,
            )
            emb = l2_normalize(flipsum if self.cfg.flip else noflip)  # [2N, D]
            plot = self.plot_dir is not None
            res = evaluate_pairs(emb[0::2], emb[1::2], issame, nfolds=self.cfg.nfolds, roc=plot)
            results[name] = {k: float(v) for k, v in res.items() if np.isscalar(v)}
            if plot and self.rank == 0:
                write_roc(self.plot_dir, name, res, label=self.out.name)
        backbone.train(was_training)
        acc = float(np.mean([r["accuracy"] for r in results.values()])) if results else -1.0
        if self.rank == 0 and self.cfg.keep_best and acc > best:
            best = acc
            folder = self.out / "best"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(backbone.state_dict(), folder / "backbone.pt.part")
            (folder / "backbone.pt.part").replace(folder / "backbone.pt")
            (folder / "eval.json").write_text(json.dumps(results, indent=1))
        return results, best
