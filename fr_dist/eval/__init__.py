"""Evaluation, as the field computes it.

* :mod:`fr_dist.eval.verification`: insightface ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30):
  10-fold accuracy, VAL@FAR=1e-3, OpenSphere AUC / EER; rank-sharded embedding.
* :mod:`fr_dist.eval.ijb`: IJB-B/C-style template verification, TAR at FAR 1e-6 .. 1e-1, and a
  writer of IJB-layout meta files for held-out identities.
* :mod:`fr_dist.eval.callback`: in-training verification.
"""
