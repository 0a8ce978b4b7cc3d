"""The one registry of the losses and their margins: every config string that names a loss (``head.name``)
or one of its margins (``head.<loss>.margin``) becomes an object here, once, when a head is built. The code
below the registry holds those objects and calls their methods; it never compares their names.

    @register_loss("sphereface2")              # at the head class of heads/losses/sphereface2.py
    class SphereFace2Head(BinaryHead): ...

    @register_margin("sphereface2", "C")       # one margin variant of that loss
    class AdditiveCosine(SphereFace2Margin): ...
"""

from __future__ import annotations

import difflib

__all__ = ["register_loss", "register_margin", "head_class", "list_losses", "margin_class", "margin_names"]

_LOSSES: dict[str, type] = {}  # loss name -> its head class
_MARGINS: dict[str, dict[str, type]] = {}  # loss name -> {margin name -> margin class}, in definition order


def register_loss(name: str):
    """Class decorator: the head class of loss ``name`` (a family head bound to its loss class) becomes the
    config choice ``head.name=<name>``; :func:`fr_dist.heads.create_head` builds it from ``head.<name>.*``."""

    def deco(head_cls: type) -> type:
        if name in _LOSSES:
            raise ValueError(
                f"loss {name!r} is registered twice ({_LOSSES[name].__name__}, {head_cls.__name__})"
            )
        head_cls.loss_name = name
        _LOSSES[name] = head_cls
        return head_cls

    return deco


def register_margin(loss: str, name: str):
    """Class decorator: margin variant ``name`` of loss ``loss`` (the value of ``head.<loss>.margin``)."""

    def deco(cls: type) -> type:
        table = _MARGINS.setdefault(loss, {})
        if name in table:
            raise ValueError(f"margin {name!r} of loss {loss!r} is registered twice")
        cls.name = name
        table[name] = cls
        return cls

    return deco


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def head_class(name: str) -> type:
    """The head class registered for ``name``; an unknown name lists the known ones (and the nearest)."""
    if name not in _LOSSES:
        near = difflib.get_close_matches(name, _LOSSES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown head {name!r}{hint}; known heads: {list_losses()}")
    return _LOSSES[name]


def margin_names(loss: str) -> tuple[str, ...]:
    """The margin names of ``loss``, in definition order (the config's choices)."""
    return tuple(_MARGINS.get(loss, {}))


def margin_class(loss: str, name: str, what: str = "margin") -> type:
    """Margin class ``name`` of ``loss``; an unknown name is a ValueError that says ``what`` it is."""
    table = _MARGINS.get(loss, {})
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {tuple(table)}")
    return table[name]
