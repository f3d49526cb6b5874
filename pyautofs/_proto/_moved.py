"""Names that moved between the public facades keep importing from their old place.

For one release after a move, ``from pyautofs import install_fds`` still works: a module
``__getattr__`` (PEP 562) finds the name in its new facade, warns with a
``DeprecationWarning`` that names the new place, and returns the same object.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Getattr", "moved_names"]

Getattr = Callable[[str], Any]
"""A module ``__getattr__``: the facades annotate theirs with it, for type checkers."""


def moved_names(module: str, moved: Mapping[str, str]) -> Getattr:
    """A module ``__getattr__`` for ``module`` whose names in ``moved`` went to ``moved[name]``."""

    def __getattr__(name: str) -> Any:
        home = moved.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} moved to {home}.{name}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), name)

    return __getattr__
