"""The patches an engine serves: each checked against the base before PEFT sees it, attached, counted, retired.

Every patch goes through the compatibility gate (`check(...).require("attach", ...)`) first, at start-up
and at runtime: an incompatible one is refused with the check's reason (`PatchRefused`), one with warnings
loads and the warnings are kept. A patch is attached to the model under an internal PEFT adapter name
(PEFT module keys cannot hold every name a user may give). Every queued or running request holds a
reference to its adapter: an unloaded patch takes no new requests at once, and its weights go when its
last running request ends (`reap`, between two forward passes). At most `max_patches` are held at once
(`TooManyPatches`: each holds its weights in memory); each remembers whether it was given at start-up, which
a client may not unload unless the server allows it (security.py decides; the registry only records).

The registry owns the model because attaching and detaching change it (the first patch wraps the base in
a `PeftModel`, removing the last one unwraps it); `model_lock` serializes that with forward passes.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..check import check
from ..errors import PortLLMError
from ..models import BaseRef
from ..patch import Patch
from ..sign import require_trusted
from .errors import BadRequest, PatchRefused, ServeError, UnknownModel
from .streams import AUTO, BASE


@dataclass(frozen=True)
class LoadedPatch:
    """A patch the engine serves: its public name, where it came from, and what `check` said."""

    name: str
    path: str
    adapter: str  # PEFT's internal adapter name
    fingerprint: str | None
    warnings: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))
    startup: bool = False  # given when the server started (a client may not unload it unless allowed)


class TooManyPatches(ServeError):
    """The registry holds `max_patches` already (each one holds weights in memory)."""

    code = "too_many_patches"


class PatchRegistry:
    """The model with its patches attached, the public names, and who is using which adapter."""

    def __init__(
        self,
        model: Any,
        ref: BaseRef,
        served_name: str,
        require_signature: bool = False,
        trusted: list | None = None,
        max_patches: int | None = None,
    ) -> None:
        if max_patches is not None and max_patches < 1:
            raise PortLLMError(f"max_patches must be at least 1, got {max_patches}")
        self.model = model
        self.max_patches = max_patches
        self.ref = ref
        self.served_name = served_name
        self.require_signature = require_signature
        self.trusted = trusted
        self.model_lock = threading.Lock()  # the model: one forward pass or one adapter change at a time
        self._lock = threading.Lock()  # the tables below
        self._patches: dict[str, LoadedPatch] = {}
        self._refs: dict[str, int] = {}  # adapter -> requests queued or running with it
        self._retired: set[str] = set()  # unloaded adapters PEFT still holds until their last request ends
        self._counter = 0

    @property
    def patches(self) -> dict[str, LoadedPatch]:
        with self._lock:
            return dict(self._patches)

    # ------------------------------------------------------------ loading and unloading

    def check(self, path: str | Path) -> tuple[Patch, list[str]]:
        """The patch, loaded and checked against the served base, and its warnings; PatchRefused if it does
        not fit (quantization only forbids merging, not attaching: as `open_lm`)."""
        require_trusted(path, self.require_signature, self.trusted)
        loaded = Patch.load(path, require_manifest=False)
        rep = check(loaded, self.ref)
        try:
            rep.require("attach", f"patch {path} does not fit {self.served_name}")
        except PortLLMError as e:
            raise PatchRefused(str(e)) from None
        warnings = rep.warnings()
        if loaded.manifest is None:
            warnings.append(
                "identity: a plain adapter (no portllm.json): the base it was made for is unknown, only its shapes "
                "were checked; `portllm import-adapter` stamps it"
            )
        return loaded, warnings

    def load(self, name: str, path: str | Path, startup: bool = False) -> LoadedPatch:
        """Check the patch against the base, then attach it under `name` (between two forward passes);
        TooManyPatches past `max_patches` (counted before the check and again when it is attached)."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise BadRequest(f"patch name {name!r} is empty or has surrounding spaces", param="lora_name")
        if name in (self.served_name, AUTO, BASE):
            raise BadRequest(f"patch name {name!r} is reserved (the base, '{AUTO}' or '{BASE}')", param="lora_name")
        with self._lock:
            if name in self._patches:
                raise BadRequest(f"a patch named {name!r} is already loaded; unload it first", param="lora_name")
            self._require_room()
        loaded, warnings = self.check(path)
        with self._lock:
            self._counter += 1
            adapter = f"p{self._counter}"  # PEFT module keys cannot hold every name a user may give
        with self.model_lock:
            self._attach(adapter, path)
        info = LoadedPatch(name, str(path), adapter, loaded.weights_sha256, tuple(warnings), startup=startup)
        with self._lock:
            if name in self._patches:  # loaded by someone else meanwhile
                self._retired.add(adapter)
                raise BadRequest(f"a patch named {name!r} is already loaded; unload it first", param="lora_name")
            try:
                self._require_room()  # others loaded meanwhile
            except TooManyPatches:
                self._retired.add(adapter)
                raise
            self._patches[name] = info
            self._refs.setdefault(adapter, 0)
        return info

    def _require_room(self) -> None:
        """(Under `_lock`.) TooManyPatches when `max_patches` are loaded."""
        if self.max_patches is not None and len(self._patches) >= self.max_patches:
            raise TooManyPatches(
                f"this server holds at most {self.max_patches} patches (--max-patches) and has "
                f"{len(self._patches)}; unload one first",
                param="lora_name",
            )

    def _attach(self, adapter: str, path: str | Path) -> None:
        from peft import PeftModel  # deferred: peft imports transformers (`export-vllm` imports this package)

        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=adapter)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=adapter)
        except Exception as e:  # whatever PEFT objects to, after check passed
            if isinstance(self.model, PeftModel) and adapter in self.model.peft_config:
                self._detach(adapter)
            raise PatchRefused(f"PEFT could not load {path}: {str(e).splitlines()[0][:300]}") from None
        self.model.eval()

    def unload(self, name: str) -> LoadedPatch:
        """New requests for `name` are refused at once; its weights go at the next `reap` after its last request."""
        with self._lock:
            info = self._patches.pop(name, None)
            if info is None:
                raise UnknownModel(f"no patch named {name!r} is loaded", param="lora_name")
            self._retired.add(info.adapter)
        return info

    def reap(self) -> None:
        """Detach the unloaded patches no request uses any more."""
        with self._lock:
            gone = [a for a in self._retired if self._refs.get(a, 0) == 0]
            for a in gone:
                self._retired.discard(a)
                self._refs.pop(a, None)
        for a in gone:
            with self.model_lock:
                self._detach(a)

    def _detach(self, adapter: str) -> None:
        if set(self.model.peft_config) == {adapter}:  # PEFT cannot run with no adapter left: unwrap the base
            self.model = self.model.unload().eval()
        else:
            self.model.delete_adapter(adapter)

    # ------------------------------------------------------------ who uses which adapter

    def acquire(self, patch: str | None) -> tuple[str, str | None]:
        """(adapter, public name) for a new request for `patch` (None or the served name: the base; AUTO: the
        router's choice, later `reassign`ed), now referenced until `release`; UnknownModel for any other name."""
        with self._lock:
            if patch in (None, self.served_name):
                adapter, name = BASE, None
            elif patch == AUTO:
                adapter, name = AUTO, AUTO
            elif patch in self._patches:
                adapter, name = self._patches[patch].adapter, patch
            else:
                raise UnknownModel(
                    f"The model `{patch}` does not exist: serving {self.served_name} with patches "
                    f"{sorted(self._patches) or 'none'}",
                    param="model",
                )
            self._refs[adapter] = self._refs.get(adapter, 0) + 1
        return adapter, name

    def reassign(self, adapter: str, patch: str | None) -> str:
        """Move one reference from `adapter` to the loaded patch `patch` (None: the base); its adapter.
        A name that is not loaded (a router's mistake, or unloaded since) is an error, never the base."""
        with self._lock:
            if patch is None:
                new = BASE
            elif patch in self._patches:
                new = self._patches[patch].adapter
            else:
                raise PortLLMError(
                    f"the router chose {patch!r}, which is not a loaded patch (loaded: "
                    f"{', '.join(sorted(self._patches)) or 'none'})"
                )
            self._refs[adapter] = self._refs.get(adapter, 1) - 1
            self._refs[new] = self._refs.get(new, 0) + 1
        return new

    def release(self, adapter: str) -> None:
        """A request that held `adapter` ended."""
        with self._lock:
            self._refs[adapter] = self._refs.get(adapter, 1) - 1

    def refs(self, adapter: str) -> int:
        """How many queued or running requests hold `adapter`."""
        with self._lock:
            return self._refs.get(adapter, 0)

    # ------------------------------------------------------------ running the model

    def adapter_names(self, adapters: list[str]) -> dict[str, Any]:
        """The forward pass's keyword that gives each row its own patch (PEFT's mixed-adapter batch), if any."""
        from peft import PeftModel  # deferred, as in `_attach`

        return {"adapter_names": adapters} if isinstance(self.model, PeftModel) else {}

    def base_only(self) -> AbstractContextManager[Any]:
        """A context in which the model runs without any patch (for routers that read the base)."""
        from peft import PeftModel  # deferred, as in `_attach`

        return self.model.disable_adapter() if isinstance(self.model, PeftModel) else nullcontext()
