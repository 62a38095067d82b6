import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


def pytest_sessionstart(session):
    """`make test` sets PORTLLM_REQUIRE_DATA=1: missing benchmark data fails the run instead of skipping tests."""
    if os.environ.get("PORTLLM_REQUIRE_DATA") != "1":
        return
    d = os.environ.get("PORTLLM_DATA")
    if not d or not Path(d).is_dir() or not any(Path(d).iterdir()):
        pytest.exit(
            f"benchmark data directory {d!r} is missing or empty (PORTLLM_DATA); the data-dependent tests would be "
            "skipped: point PORTLLM_DATA at the data, or run pytest without PORTLLM_REQUIRE_DATA=1",
            returncode=4,
        )


def deps_required() -> bool:
    """`make test` sets PORTLLM_REQUIRE_DEPS=1 (and PORTLLM_REQUIRE_DATA=1): there a missing test dependency
    fails the run, as missing data does, instead of skipping tests silently."""
    return os.environ.get("PORTLLM_REQUIRE_DEPS") == "1" or os.environ.get("PORTLLM_REQUIRE_DATA") == "1"


def require_module(name: str) -> ModuleType:
    """Import `name` for a test (use instead of pytest.importorskip): when it is missing, fail under
    `make test` (PORTLLM_REQUIRE_DEPS=1 or PORTLLM_REQUIRE_DATA=1), else skip."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        msg = f"test dependency {name!r} is missing ({e}): run `make install`"
    if deps_required():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg, allow_module_level=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Unit tests never touch the user's cache; integration tests share one per session."""
    if "PORTLLM_TEST_CACHE" not in os.environ:
        os.environ["PORTLLM_TEST_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("PORTLLM_CACHE", os.environ["PORTLLM_TEST_CACHE"])


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """θ, θ' (perturbed θ) and a LoRA adapter + imported patch made on θ."""
    root = tmp_path_factory.mktemp("world")
    os.environ.setdefault("PORTLLM_TEST_CACHE", str(root / "cache"))
    os.environ["PORTLLM_CACHE"] = os.environ["PORTLLM_TEST_CACHE"]
    from portllm import import_adapter

    old = tiny.make_base(root / "theta")
    new = tiny.evolve(old, root / "theta2")
    adapter = tiny.make_adapter(old, root / "adapter")
    patch = root / "patch"
    import_adapter(adapter, old, patch, task="toy")
    return {"root": root, "old": old, "new": new, "adapter": adapter, "patch": patch}
