"""`import portllm` loads no torch, and `portllm port` queues the copy of the base before anything imports it.

Each check runs in a fresh interpreter: in this one, torch is already imported by other tests.
"""

import json
import os
import subprocess
import sys

HEAVY = ("torch", "transformers", "peft")
# `dir(portllm)` of the package that imported every exported name eagerly
EAGER_DIR = [
    "BaseInfo", "BaseRef", "Manifest", "Patch", "PortLLMError", "__all__", "__builtins__", "__cached__", "__doc__",
    "__file__", "__loader__", "__name__", "__package__", "__path__", "__spec__", "__version__", "architectures",
    "atomic", "base_info", "check", "errors", "export_base", "fingerprint", "import_adapter", "load_base", "models",
    "patch", "port", "progress", "resolve_base", "resources", "sign", "stream",
]  # fmt: skip
ALL = [
    "BaseInfo", "BaseRef", "Manifest", "PortLLMError", "Patch", "base_info", "check", "export_base", "fingerprint",
    "import_adapter", "load_base", "port", "resolve_base",
]  # fmt: skip


def python(code, *args):
    """Run `code` in a fresh interpreter; its last stdout line, parsed as JSON."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_portllm_loads_no_torch():
    loaded = python(
        "import json, sys, portllm; print(json.dumps([m for m in sys.argv[1:] if m in sys.modules]))", *HEAVY
    )
    assert loaded == []


def test_the_api_is_unchanged_and_check_and_port_stay_functions():
    """`check` and `port` are functions, also once their submodules are imported (which sets the package's attribute
    of that name to the module); `__all__` and `dir()` are those of the eager package."""
    got = python(
        """
import json, sys, types
import portllm.check, portllm.port
import portllm
from portllm import check, port, Patch
import portllm.check as via_import  # what the eager package gave too: the function
names = {n: getattr(portllm, n) for n in portllm.__all__}
print(json.dumps({
    "dir": dir(portllm),
    "kinds": [type(o).__name__ for o in (check, port, portllm.check, portllm.port, via_import)],
    "same": check is portllm.check and port is portllm.port,
    "modules": [isinstance(sys.modules[m], types.ModuleType) for m in ("portllm.check", "portllm.port")],
    "names": {n: getattr(o, "__module__", None) for n, o in names.items()},
    "all": portllm.__all__,
}))
"""
    )
    assert got["kinds"] == ["function"] * 5 and got["same"] and got["modules"] == [True, True]
    assert got["names"]["port"] == "portllm.port" and got["names"]["Patch"] == "portllm.patch"
    assert got["all"] == ALL
    # every exported name, and nothing of the lazy machinery; submodules show once imported (`sign` is imported by
    # a port, no longer by `import portllm.port`)
    assert set(ALL) | {"__version__"} <= set(got["dir"]) <= set(EAGER_DIR)
    assert set(EAGER_DIR) - set(got["dir"]) == {"sign"}


def test_a_test_can_still_replace_port_on_the_package(monkeypatch):
    import portllm

    real = portllm.port
    monkeypatch.setattr(portllm, "port", "replaced")
    assert portllm.port == "replaced"
    monkeypatch.undo()
    assert portllm.port is real


SPY = """
import json, sys
from portllm.stream import WriteBehind
seen = []
real = WriteBehind.copy_run
def copy_run(self, *a):
    seen.append([m for m in ("torch", "transformers", "peft") if m in sys.modules])
    return real(self, *a)
WriteBehind.copy_run = copy_run
"""


def test_port_queues_the_copy_before_torch_is_imported(world, tmp_path):
    got = python(
        SPY
        + """
from portllm import port
port(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps(seen))
""",
        world["patch"],
        world["new"],
        tmp_path / "o",
    )
    assert got and all(loaded == [] for loaded in got)  # every run of every shard
    assert (tmp_path / "o" / "config.json").is_file()


def test_the_port_command_queues_the_copy_before_torch_is_imported(world, tmp_path):
    """`portllm port` imports only its own command module at start-up: the others import torch."""
    got = python(
        SPY
        + """
import portllm.cli
sys.argv = ["portllm", "port", sys.argv[1], "--base", sys.argv[2], "--out", sys.argv[3]]
try:
    portllm.cli.main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps(seen))
""",
        world["patch"],
        world["new"],
        tmp_path / "o",
    )
    assert got and all(loaded == [] for loaded in got)
    assert (tmp_path / "o" / "config.json").is_file()


def test_each_quick_command_lives_in_the_module_it_is_named_with():
    """`portllm.cli.QUICK` names the one module a command needs at start-up: the full app agrees."""
    from portllm import cli

    quick = {c.name: c.callback.__module__ for c in cli.app.registered_commands if c.name in cli.QUICK}
    assert quick == {name: f"portllm.cli.{mod}" for name, mod in cli.QUICK.items()}
