"""Package attributes imported on first use (PEP 562), so that importing a package that names them
loads no torch: `__getattr__ = lazy_getattr(__name__, {"name": ".submodule", ...})`."""
from __future__ import annotations

import importlib
import sys


def lazy_getattr(package: str, table: dict[str, str]):
    """A module-level __getattr__ for `package`: table[name] is the (relative) submodule holding name;
    the first access imports it and keeps the value in the package, so later ones skip this."""
    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
