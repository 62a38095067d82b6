"""Signed patches: ML-DSA-65 (FIPS 204) signatures over the patch manifest.

`portllm.json` already holds the sha256 of every file PEFT reads and the patch's lineage, so one
signature over its canonical bytes (sorted keys, no whitespace) covers the whole patch. The
signature lives beside it in `portllm.sig`; signing never changes `portllm.json`, so the
checksums hold. ML-DSA is post-quantum: a patch's signature outlives the elliptic-curve ones a
quantum computer would forge. Verification reads no tensor: a refused patch is refused before use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey

from . import __version__
from .atomic import write_text_atomic
from .errors import PortLLMError
from .patch import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, Manifest, Patch, now, parse_manifest, sha256_file

ALGORITHM = "ML-DSA-65"
SIGNATURE = "portllm.sig"
SIG_FORMAT = "portllm-signature"
SIG_FORMAT_VERSION = 1
CONTEXT = "portllm-patch-v1"  # ML-DSA context string: a patch signature verifies as nothing else
SIGNED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # what PEFT reads; a signed manifest must cover both

TrustedKey = Union[str, Path, "MLDSA65PublicKey"]


class SignatureError(PortLLMError):
    """A patch refused because it is unsigned, altered after signing, or signed by a key not trusted."""


# ---------------------------------------------------------------- keys


@dataclass
class KeyPair:
    private: Path
    public: Path
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"private": str(self.private), "public": str(self.public), "fingerprint": self.fingerprint}


def key_fingerprint(public_key: MLDSA65PublicKey) -> str:
    """sha256 of the raw public key: how a signature names its key, and how people compare keys."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


def keygen(prefix: str | Path, overwrite: bool = False) -> KeyPair:
    """Write PREFIX.key (private, mode 0600) and PREFIX.pub, both or neither; never clobbers unless asked."""

    prefix = Path(prefix)
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    if not overwrite:
        for p in (key_path, pub_path):
            if p.exists():
                raise PortLLMError(f"{p} already exists; choose another prefix or pass --overwrite")
    key = MLDSA65PrivateKey.generate()
    key_pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub_pem = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PortLLMError(f"cannot create {key_path.parent}: {e.strerror or e}") from None
    staged = [_stage(key_path, key_pem, 0o600), _stage(pub_path, pub_pem, None)]
    placed: list[Path] = []
    try:
        for tmp, dest in zip(staged, (key_path, pub_path)):
            _place(tmp, dest, overwrite)
            placed.append(dest)
    except BaseException:
        if not overwrite:  # a fresh pair is all or nothing
            for p in placed:
                p.unlink(missing_ok=True)
        raise
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    return KeyPair(key_path, pub_path, key_fingerprint(key.public_key()))


def _stage(dest: Path, data: bytes, mode: int | None) -> Path:
    """Write `data` to a hidden sibling, created with `mode` from the start (a key is never readable by others)."""
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if mode is None else mode)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise PortLLMError(f"could not write {dest}: {e.strerror or e}") from None
    return tmp


def _place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename into place; without `overwrite`, a hard link so an existing file is never replaced."""
    try:
        if overwrite:
            os.replace(tmp, dest)
            return
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise PortLLMError(f"{dest} already exists; choose another prefix or pass --overwrite") from None
        except OSError:  # a file system without hard links
            if dest.exists():
                raise PortLLMError(f"{dest} already exists; choose another prefix or pass --overwrite") from None
            os.rename(tmp, dest)
    except OSError as e:
        raise PortLLMError(f"could not write {dest}: {e.strerror or e}") from None


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PortLLMError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not data.lstrip().startswith(b"-----BEGIN "):
        raise PortLLMError(f"{path} is not a PEM {what} (make one with `portllm keygen PREFIX`)")
    return data


def load_private_key(path: str | Path) -> MLDSA65PrivateKey:
    """An ML-DSA-65 private key written by `keygen`; a public key or another algorithm is refused by name."""

    data = _read_pem(Path(path), "private key")
    if b"PUBLIC KEY-----" in data:
        raise PortLLMError(f"{path} is a public key; sign with the private key (PREFIX.key)")
    try:
        key = ser.load_pem_private_key(data, password=None)
    except TypeError:
        raise PortLLMError(f"{path} is encrypted; portllm reads unencrypted ML-DSA-65 keys (mode 0600)") from None
    except Exception as e:  # cryptography raises ValueError or UnsupportedAlgorithm, with long messages
        raise PortLLMError(f"{path}: not a readable private key ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(key, MLDSA65PrivateKey):
        raise PortLLMError(f"{path} is a {type(key).__name__}, not an {ALGORITHM} key")
    return key


def load_public_key(path: str | Path) -> MLDSA65PublicKey:
    """An ML-DSA-65 public key (PREFIX.pub)."""

    data = _read_pem(Path(path), "public key")
    if b"PRIVATE KEY-----" in data:
        raise PortLLMError(f"{path} is a private key; trust the public key (PREFIX.pub), never share the .key")
    try:
        key = ser.load_pem_public_key(data)
    except Exception as e:
        raise PortLLMError(f"{path}: not a readable public key ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(key, MLDSA65PublicKey):
        raise PortLLMError(f"{path} is a {type(key).__name__}, not an {ALGORITHM} key")
    return key


def _trusted_keys(trusted: Iterable[TrustedKey] | None) -> dict[str, tuple[str, MLDSA65PublicKey]]:
    """fingerprint -> (where the key came from, key)."""

    keys = {}
    for t in trusted or ():
        key = t if isinstance(t, MLDSA65PublicKey) else load_public_key(t)
        label = "key object" if isinstance(t, MLDSA65PublicKey) else str(t)
        keys.setdefault(key_fingerprint(key), (label, key))
    if not keys:
        raise PortLLMError("no trusted public key given; pass --trust KEY.pub (made by `portllm keygen`)")
    return keys


# ---------------------------------------------------------------- the signature file


@dataclass
class Signature:
    """`portllm.sig`: who signed which manifest, and the signature itself."""

    key_fingerprint: str
    manifest_sha256: str
    signature: str  # base64
    algorithm: str = ALGORITHM
    context: str = CONTEXT
    signed: str = field(default_factory=now)
    tool_version: str = __version__
    format: str = SIG_FORMAT
    format_version: int = SIG_FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: Any) -> Signature:
        if not isinstance(d, dict) or d.get("format") != SIG_FORMAT:
            raise ValueError("not a portllm signature file")
        if not isinstance(d.get("format_version", 1), int) or d.get("format_version", 1) > SIG_FORMAT_VERSION:
            raise ValueError(f"signature format {d.get('format_version')!r} is newer than this portllm; upgrade it")
        try:
            kw = {k: d[k] for k in ("key_fingerprint", "manifest_sha256", "signature")}
        except KeyError as e:
            raise ValueError(f"field {e.args[0]!r} is missing") from None
        if not all(isinstance(v, str) and v.isprintable() for v in kw.values()):
            raise ValueError("fingerprint, manifest digest and signature must be printable strings")
        opt = {k: d[k] for k in ("algorithm", "context", "signed", "tool_version", "format_version") if k in d}
        for k in ("algorithm", "context", "signed", "tool_version"):  # they are quoted in one-line messages
            if k in opt and not (isinstance(opt[k], str) and opt[k].isprintable()):
                raise ValueError(f"field {k!r} must be a printable string")
        return cls(**kw, **opt)

    def to_dict(self) -> dict[str, Any]:
        order = ("format", "format_version", "algorithm", "context", "key_fingerprint", "manifest_sha256", "signed")
        d = asdict(self)
        return {k: d.pop(k) for k in order} | d  # what a reader looks for first; the long signature last

    def record(self) -> dict[str, Any]:
        """What a derived patch keeps in its lineage: enough to show who signed its source, and check it."""
        return {
            "algorithm": self.algorithm,
            "key_fingerprint": self.key_fingerprint,
            "manifest_sha256": self.manifest_sha256,
            "signature": self.signature,
            "signed": self.signed,
        }


def canonical_manifest(raw: dict[str, Any]) -> bytes:
    """The signed bytes: portllm.json's content as canonical JSON, so reformatting the file changes nothing."""
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def read_signature(path: str | Path) -> Signature | None:
    """A patch's `portllm.sig` (None when unsigned); a malformed file is an error."""
    f = Path(path) / SIGNATURE
    if not f.is_file():
        return None
    try:
        return Signature.from_dict(json.loads(f.read_text()))
    except (OSError, ValueError, TypeError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise PortLLMError(f"{f}: unreadable signature ({' '.join(str(e).split())[:160]})") from None


def signature_record(path: str | Path | None) -> dict[str, Any] | None:
    """The lineage record of a patch's signature, or None when it has none (or it cannot be read)."""
    if path is None:
        return None
    try:
        sig = read_signature(path)
    except PortLLMError:
        return None
    return sig.record() if sig else None


def _read_manifest_once(path: Path) -> tuple[dict[str, Any], bytes, Manifest]:
    """portllm.json read once: the raw object, its canonical bytes, and the vetted manifest."""
    f = path / MANIFEST
    if not f.is_file():
        raise PortLLMError(f"{path} has no {MANIFEST}: not a portllm patch (import a plain adapter first)")
    try:
        raw = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise PortLLMError(f"{f}: not valid JSON ({' '.join(str(e).split())[:160]})") from None
    manifest = parse_manifest(raw, f)  # refuses text that is not valid Unicode, so the canonical bytes encode
    return raw, canonical_manifest(raw), manifest


def _file_problem(path: Path, manifest: Manifest) -> tuple[str, str] | None:
    """(code, reason) for the first file PEFT reads that the manifest does not vouch for, else None."""
    for name in SIGNED_FILES:
        if name not in manifest.files:
            return "file-unlisted", f"{MANIFEST} lists no sha256 for {name}, so the signature would not cover it"
    for name, digest in manifest.files.items():
        f = path / name
        if not f.is_file():
            return "file-missing", f"{name} is missing"
        if sha256_file(f) != digest:
            return "file-modified", f"{name} was modified after signing (its sha256 differs from the signed manifest)"
    return None


def sign_patch(path: str | Path, key: str | Path | MLDSA65PrivateKey) -> Signature:
    """Sign a patch in place: write `portllm.sig` (replacing an older one); `portllm.json` is left untouched."""

    path = Path(path)
    if not path.is_dir():
        raise PortLLMError(f"patch {path} does not exist or is not a directory")
    if not isinstance(key, MLDSA65PrivateKey):
        key = load_private_key(key)
    _, payload, manifest = _read_manifest_once(path)
    problem = _file_problem(path, manifest)
    if problem:
        raise PortLLMError(f"refusing to sign {path}: {problem[1].replace(' after signing', '')}")
    sig = Signature(
        key_fingerprint=key_fingerprint(key.public_key()),
        manifest_sha256=hashlib.sha256(payload).hexdigest(),
        signature=base64.b64encode(key.sign(payload, CONTEXT.encode())).decode("ascii"),
    )
    write_text_atomic(path / SIGNATURE, json.dumps(sig.to_dict(), indent=2) + "\n")
    return sig


# ---------------------------------------------------------------- verification


@dataclass
class Verification:
    """The verdict on one patch; `reason` is one line, `code` a stable name for it."""

    path: str
    valid: bool
    code: str
    reason: str
    key_fingerprint: str | None = None
    key: str | None = None  # which --trust file matched
    signed: str | None = None
    manifest_sha256: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # the signed checksums

    @property
    def exit_code(self) -> int:
        return 0 if self.valid else 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_signature(path: str | Path, trusted: Iterable[TrustedKey]) -> Verification:
    """Is this patch signed by a trusted key and unchanged since? Never raises for a bad patch, only bad input."""

    path = Path(path)
    if not path.is_dir():
        raise PortLLMError(f"patch {path} does not exist or is not a directory")
    keys = _trusted_keys(trusted)
    bad = lambda code, reason, **kw: Verification(str(path), False, code, reason, **kw)  # noqa: E731
    if not (path / SIGNATURE).is_file():
        return bad("unsigned", f"the patch is unsigned: {path} has no {SIGNATURE} (sign it with `portllm sign`)")
    try:
        sig = read_signature(path)
    except PortLLMError as e:
        return bad("malformed-signature", f"{SIGNATURE} is malformed: {str(e).split(': ', 1)[-1]}")
    if sig is None:  # removed since the check above
        return bad("unsigned", f"the patch is unsigned: {path} has no {SIGNATURE} (sign it with `portllm sign`)")
    if sig.algorithm != ALGORITHM or sig.context != CONTEXT:
        return bad(
            "unsupported", f"{SIGNATURE} uses {sig.algorithm} ({sig.context}); this portllm verifies {ALGORITHM}"
        )
    who = {"key_fingerprint": sig.key_fingerprint, "signed": sig.signed}
    if sig.key_fingerprint not in keys:
        return bad(
            "untrusted-key",
            f"signed by key {sig.key_fingerprint[:16]}…, which is not among the {len(keys)} trusted key(s) "
            f"({', '.join(f'{label} {fp[:16]}…' for fp, (label, _) in keys.items())})",
            **who,
        )
    label, key = keys[sig.key_fingerprint]
    who["key"] = label
    try:
        _, payload, manifest = _read_manifest_once(path)
    except PortLLMError as e:
        return bad("manifest-invalid", f"{MANIFEST} is unreadable: {e}", **who)
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sig.manifest_sha256:
        return bad(
            "manifest-modified", f"{MANIFEST} was modified after signing (its content is not what was signed)", **who
        )
    try:
        key.verify(base64.b64decode(sig.signature, validate=True), payload, CONTEXT.encode())
    except (InvalidSignature, binascii.Error, ValueError):
        return bad(
            "bad-signature",
            f"the signature in {SIGNATURE} does not verify with key {sig.key_fingerprint[:16]}… (forged or altered)",
            **who,
        )
    who["manifest_sha256"] = digest
    problem = _file_problem(path, manifest)
    if problem:
        return bad(*problem, **who)
    return Verification(
        str(path),
        True,
        "valid",
        f"valid: signed by {sig.key_fingerprint[:16]}… ({label}) on {sig.signed}; "
        f"{len(manifest.files)} files match the signed manifest",
        files=dict(manifest.files),
        **who,
    )


def verify_patch(path: str | Path, trusted: Iterable[TrustedKey]) -> Verification:
    """`check_signature`, raising SignatureError (one line) unless the patch is valid."""
    v = check_signature(path, trusted)
    if not v.valid:
        raise SignatureError(f"refusing patch {path}: {v.reason}")
    return v


def require_trusted(
    patch: Patch | str | Path, require_signature: bool = False, trusted: Iterable[TrustedKey] | None = None
) -> Verification | None:
    """The hook `port`, `merge` and `open_lm` share, called before any tensor is read: None when no signature
    is asked for; else the verification, or SignatureError. Trusted keys alone also ask for a signature.
    """
    trusted = list(trusted or ())
    if not (require_signature or trusted):
        return None
    path = patch.path if isinstance(patch, Patch) else Path(patch)
    if path is None:
        raise PortLLMError("a signature can only be required of a patch saved on disk, not an in-memory patch")
    return verify_patch(path, trusted)


def load_patch(
    patch: Patch | str | Path, require_signature: bool = False, trusted: Iterable[TrustedKey] | None = None
) -> tuple[Patch, Verification | None]:
    """`require_trusted`, then the patch loaded from the verified files (an in-memory copy may differ)."""
    v = require_trusted(patch, require_signature, trusted)
    if v is None:
        return (patch if isinstance(patch, Patch) else Patch.load(patch)), None
    path = Path(v.path)
    loaded = Patch.load(path)
    if loaded.manifest is None or loaded.manifest.files != v.files:
        raise SignatureError(f"refusing patch {path}: {MANIFEST} changed while it was being verified")
    return loaded, v
