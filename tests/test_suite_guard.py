"""The test run itself: `make test` must fail, not skip, when the benchmark data is absent."""

import os
import subprocess
import sys
from pathlib import Path


def _pytest(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    conftest = Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    (tmp_path / "tiny.py").write_text("")
    e = {k: v for k, v in os.environ.items() if k not in ("PORTLLM_DATA", "PORTLLM_REQUIRE_DATA")} | env
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=tmp_path, timeout=120)


def test_missing_data_fails_the_run_when_required(tmp_path):
    r = _pytest(tmp_path, {"PORTLLM_REQUIRE_DATA": "1", "PORTLLM_DATA": str(tmp_path / "nowhere")})
    assert r.returncode == 4 and "missing or empty" in r.stdout + r.stderr


def test_present_data_runs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "SOURCES.md").write_text("x")
    r = _pytest(tmp_path, {"PORTLLM_REQUIRE_DATA": "1", "PORTLLM_DATA": str(data)})
    assert r.returncode == 0, r.stdout + r.stderr
