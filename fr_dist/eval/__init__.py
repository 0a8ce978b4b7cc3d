"""Evaluation: pair verification (.bin), IJB-style templates, in-training callbacks."""
