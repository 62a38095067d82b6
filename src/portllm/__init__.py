"""PortLLM: carry LoRA model patches onto evolved base LLMs without training."""

__version__ = "0.1.0"

from .check import check  # noqa: E402
from .errors import PortLLMError  # noqa: E402
from .models import BaseInfo, BaseRef, base_info, export_base, fingerprint, load_base, resolve_base  # noqa: E402
from .patch import Manifest, Patch, import_adapter  # noqa: E402
from .port import port  # noqa: E402

__all__ = [
    "BaseInfo",
    "BaseRef",
    "Manifest",
    "PortLLMError",
    "Patch",
    "base_info",
    "check",
    "export_base",
    "fingerprint",
    "import_adapter",
    "load_base",
    "port",
    "resolve_base",
]
