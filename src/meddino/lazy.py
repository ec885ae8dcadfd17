"""One style for every package's ``__init__``: a docstring and its public names, each imported on first use.

``__all__, __getattr__ = lazy_exports(__name__, {"name": "module", ...})`` (PEP 562). Looking names up lazily
keeps the CLI's parse (which imports every layer's ``commands`` and so its package) free of torch and timm,
and keeps packages whose modules import each other through the package from importing in a circle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package``: ``exports`` maps each public name to the module holding it
    (absolute, or relative to the package when it starts with a dot)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return sorted(exports), __getattr__
