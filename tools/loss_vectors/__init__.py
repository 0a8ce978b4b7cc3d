"""One module per loss of tools/make_loss_vectors.py: REPOSITORY ("owner/name"), REV (pinned commit), FILES
(paths read from it), ``generate(modules) -> (arrays, meta)`` (``modules``: {file basename: imported module})."""
