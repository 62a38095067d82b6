"""The README's Layout section names every module of the package, and nothing that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "portllm"
SKIP = {"__init__.py", "__main__.py"}


def layout_entries() -> dict[str, str]:
    """Entry (`models.py`, `eval/`) -> its text, from the code block under '## Layout'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1]
    block = section.split("```", 2)[1]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        m = re.match(r"^  (\S+)\s", line + " ")
        if m and line.startswith("  ") and not line.startswith("   "):
            current = m.group(1)
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += "\n" + line
        elif line and not line.startswith(" "):
            current = None  # benchmarks/, tests/: outside src/portllm
    return entries


def test_every_module_is_in_the_layout_and_every_named_module_exists():
    entries = layout_entries()
    missing, stale = [], []
    for path in sorted(PKG.iterdir()):
        if path.suffix == ".py" and path.name not in SKIP and path.name not in entries:
            missing.append(path.name)
        if path.is_dir() and (path / "__init__.py").exists():
            key = f"{path.name}/"
            if key not in entries:
                missing.append(key)
                continue
            named = set(re.findall(r"\b(\w+\.py)\b", entries[key]))
            for mod in sorted(path.glob("*.py")):
                if mod.name not in SKIP and mod.name not in named:
                    missing.append(f"{key}{mod.name}")
            for name in sorted(named):
                if not (path / name).exists():
                    stale.append(f"{key}{name}")
    for entry in entries:
        if entry.endswith(".py") and not (PKG / entry).exists():
            stale.append(entry)
    assert not missing, f"README Layout does not name: {missing}"
    assert not stale, f"README Layout names modules that do not exist: {stale}"
