"""A heavy module bound at import, loaded at first use.

`torch = lazy_module("torch")` at the top of a module lets the driver import a method, the server or the
evaluation maths (for their declarations and their Ray actor classes) without importing torch: a process
that imports torch holds about 0.3 GB before it does anything, and the driver of a run on stored features
never computes with it. The first attribute read imports the module, and from then on its names are read
from this object's own dict, as fast as from the module itself. Pickled, it is the module's name.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module `name` until an attribute is read from it."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_lazy_name", name)

    def _load(self) -> ModuleType:
        module = self.__dict__.get("_lazy_module")
        if module is None:
            module = importlib.import_module(self._lazy_name)
            # Copy the module's names once: later reads find them here without calling __getattr__. Names
            # the module gains later (a submodule it imports on demand) still arrive through __getattr__.
            self.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
            self.__dict__["_lazy_module"] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # pickling, copying and introspection probes; not the module's names
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError(f"{self._lazy_name} is bound lazily here; set {attr} on the module itself")

    def __reduce__(self):
        return lazy_module, (self._lazy_name,)

    def __repr__(self) -> str:
        return f"<lazy module {self._lazy_name!r}>"


def lazy_module(name: str) -> LazyModule:
    """`name`, imported when first used."""
    return LazyModule(name)
