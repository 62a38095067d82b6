"""PortLLM: carry LoRA model patches onto evolved base LLMs without training.

The names below are imported on first use (PEP 562), not by `import portllm`: most of them need torch, whose
import takes about a second, and `portllm port` copies the base's shards while it loads (`port.py`).

`check` and `port` are both functions and submodules. Importing a submodule sets the package's attribute of that
name to the module, which would make `from portllm import port` return a module once anything has imported
`portllm.port`; the package's class keeps the function there instead (`sys.modules` still holds the module).
"""

import importlib as _importlib
import sys as _sys
import types as _types
from typing import Any as _Any

__version__ = "0.1.0"

_HOME = {  # exported name -> the submodule that defines it
    "BaseInfo": "models",
    "BaseRef": "models",
    "Manifest": "patch",
    "PortLLMError": "errors",
    "Patch": "patch",
    "base_info": "models",
    "check": "check",
    "export_base": "models",
    "fingerprint": "models",
    "import_adapter": "patch",
    "load_base": "models",
    "port": "port",
    "resolve_base": "models",
}
__all__ = list(_HOME)
_SET = {}  # what `check` and `port` are: their functions once looked up, or what a test assigned (monkeypatch)


def _load(name: str) -> _Any:
    return getattr(_importlib.import_module(f".{_HOME[name]}", __name__), name)


def __getattr__(name: str) -> _Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _load(name)
    globals()[name] = value  # later lookups find it without this call
    return value


def __dir__() -> list[str]:
    """The exported names, `__version__` and the submodules imported so far; not this file's helpers."""
    own = [n for n in globals() if not n.startswith("_") or n.startswith("__") and n not in ("__getattr__", "__dir__")]
    return sorted(set(own) | set(__all__))


def _shadowed(name: str) -> property:
    """The function `name` on every lookup; the import system's assignment of the submodule is kept aside."""

    def get(self: _types.ModuleType) -> _Any:
        if name not in _SET:
            _SET[name] = _load(name)
        return _SET[name]

    def put(self: _types.ModuleType, value: _Any) -> None:
        if not (isinstance(value, _types.ModuleType) and value.__name__ == f"{__name__}.{name}"):
            _SET[name] = value

    def drop(self: _types.ModuleType) -> None:  # the next lookup finds the submodule's function again
        _SET.pop(name, None)

    return property(get, put, drop, doc=f"portllm.{name}.{name}")


class _Package(_types.ModuleType):
    """`portllm` itself: a module whose shadowed names are data descriptors (they win over any assignment)."""

    check = _shadowed("check")
    port = _shadowed("port")


_sys.modules[__name__].__class__ = _Package
