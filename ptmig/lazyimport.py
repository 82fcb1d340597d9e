"""Modules loaded on first use, for what a VMM process needs only on some paths.

A VMM's private memory is part of what a guest costs the host (`memstats`), and every module
it imports stays resident for its lifetime. `lazy_module` returns a module object whose code
runs at its first attribute access (the standard library's `importlib.util.LazyLoader`), so a
module needed only for, say, a TLS channel is paid for only by a VMM that opens one.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """`name` (a top-level module), imported now if it already is, else on first use."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
