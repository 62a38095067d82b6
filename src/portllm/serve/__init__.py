"""`portllm serve`: patches behind OpenAI's API, each checked against the base before it loads.

`Engine` (engine.py) owns the model and batches requests for different patches into shared forward
passes; `create_app` (app.py, needs the `serve` extra: FastAPI + uvicorn) puts OpenAI's endpoints
over it; `export_vllm` (vllm.py) writes the patch set as vLLM LoRA modules, checked, with the
`vllm serve` command that serves them.
"""

from .engine import (
    AUTO,
    BASE,
    Completion,
    Engine,
    EngineConfig,
    Event,
    GenRequest,
    LoadedPatch,
    RequestRouter,
    SamplingParams,
    ServeError,
    Stream,
    router_factory,
)
from .vllm import VllmExport, export_vllm, vllm_command

__all__ = [
    "AUTO",
    "BASE",
    "Completion",
    "Engine",
    "EngineConfig",
    "Event",
    "GenRequest",
    "LoadedPatch",
    "RequestRouter",
    "SamplingParams",
    "ServeError",
    "Stream",
    "VllmExport",
    "create_app",
    "export_vllm",
    "router_factory",
    "vllm_command",
]


def create_app(*args, **kwargs):
    """`app.create_app`, imported on use: FastAPI is an optional dependency (`pip install portllm[serve]`)."""
    try:
        from .app import create_app as make
    except ImportError as e:
        from ..errors import PortLLMError

        raise PortLLMError(f"serving needs FastAPI and uvicorn: pip install 'portllm[serve]' ({e})") from None
    return make(*args, **kwargs)
