"""Lazy imports of heavy or optional libraries, with an "install X" message.

Each third-party heavy library is imported in the one module that owns it, through
``require``, at the moment it is first needed — never at import time of our package.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependency


def require(module: str, package: str | None = None, purpose: str = "this feature") -> ModuleType:
    """Import ``module`` or raise MissingDependency naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # An ImportError raised *inside* the library (broken install) is worth showing too.
        missing = getattr(exc, "name", None)
        if missing and missing.split(".")[0] != module.split(".")[0]:
            raise MissingDependency(missing, f"{purpose} (via {module})") from exc
        raise MissingDependency(package or module.split(".")[0], purpose) from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
