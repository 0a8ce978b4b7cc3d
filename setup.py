"""Shim for tools and users that expect ``python setup.py develop``; metadata lives in pyproject.toml."""

from setuptools import setup

setup()
