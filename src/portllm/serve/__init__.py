"""`portllm serve`: patches behind OpenAI's API, each checked against the base before it loads.

`Engine` (engine.py) owns the model and batches requests for different patches into shared forward
passes: its patches in `PatchRegistry` (patches.py, each checked first), its worker thread and
continuous batching in `Scheduler` (scheduler.py), the KV-cache surgery in kvcache.py, per-row
sampling in sampling.py, requests and their event streams in streams.py, its refusals in errors.py,
each output's text decoded a token at a time in detokenize.py, log-probabilities in logprobs.py, and
who may do what (API keys, patch roots, body and context limits) in security.py.
`create_app` (app.py, needs the `serve` extra: FastAPI + uvicorn) puts OpenAI's endpoints over it (their
bodies in schema.py);
`export_vllm` (vllm.py) writes the patch set as vLLM LoRA modules, checked, with the `vllm serve`
command that serves them.
"""

from ..errors import PortLLMError
from .detokenize import DecodeSpec, Detokenizer, decode_spec
from .engine import Engine, EngineConfig, RequestRouter, router_factory
from .errors import BadRequest, ContextTooLong, Overloaded, PatchRefused, ServeError, Unavailable, UnknownModel
from .logprobs import MAX_LOGPROBS, TokenLogprob
from .patches import LoadedPatch, PatchRegistry
from .sampling import SamplingParams
from .scheduler import Scheduler
from .security import ServerSecurity
from .streams import AUTO, BASE, Completion, Event, GenRequest, Stream
from .vllm import VllmExport, export_vllm, vllm_command

__all__ = [
    "AUTO",
    "BASE",
    "MAX_LOGPROBS",
    "BadRequest",
    "Completion",
    "ContextTooLong",
    "DecodeSpec",
    "Detokenizer",
    "Engine",
    "EngineConfig",
    "Event",
    "GenRequest",
    "LoadedPatch",
    "Overloaded",
    "PatchRefused",
    "PatchRegistry",
    "RequestRouter",
    "SamplingParams",
    "Scheduler",
    "ServeError",
    "ServerSecurity",
    "Stream",
    "TokenLogprob",
    "Unavailable",
    "UnknownModel",
    "VllmExport",
    "create_app",
    "decode_spec",
    "export_vllm",
    "router_factory",
    "vllm_command",
]


def create_app(*args, **kwargs):
    """`app.create_app`, imported on use: FastAPI is an optional dependency (`pip install portllm[serve]`)."""
    try:
        from .app import create_app as make
    except ImportError as e:
        raise PortLLMError(f"serving needs FastAPI and uvicorn: pip install 'portllm[serve]' ({e})") from None
    return make(*args, **kwargs)
