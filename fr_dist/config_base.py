"""What every config section of fr_dist shares: :data:`SECTION_CONFIG`, the pydantic settings of a component's
``Config`` dataclass (unknown keys refused with the valid ones listed by the loader, no inf / nan, each field's
attribute docstring its documentation in ``fr-dist config --help-keys``)."""

from __future__ import annotations

from pydantic import ConfigDict

__all__ = ["SECTION_CONFIG"]

SECTION_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)
