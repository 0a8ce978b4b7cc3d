"""Errors every layer may raise (layer 0): the config error is reported before anything starts."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration mistake, reported before anything starts."""
