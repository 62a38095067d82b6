"""`portllm serve` as a hostile client meets it: API keys, runtime loading only from the patch roots, request
limits, no internals in a 5xx, the vLLM pass-through, and a property-based fuzz of the server's own OpenAPI
schema (schemathesis). Real server processes on a tiny model built in code."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tiny
from conftest import require_module
from portllm import import_adapter

httpx = require_module("httpx")
openai = require_module("openai")
require_module("fastapi")

KEY = "sk-test-7c1d0e"  # the server's key; never in its output
OTHER_KEY = "sk-second-key"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
CONTEXT = 128  # tiny.tiny_config's max_position_embeddings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base; patches a (start-up), b, c inside the patch root; a valid patch outside it, a symlink
    to it from inside, a patch directory inside whose weights file is a symlink to one outside, and one
    outside whose files are all symlinks to patch b's (the directory itself must be inside)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("secure")
    base = tiny.make_base(root / "base", bpe=True, vocab_size=320, hidden=32, layers=1)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    patches, outside = root / "patches", root / "outside"
    patches.mkdir()
    outside.mkdir()
    for name, seed, where in (("a", 1, patches), ("b", 2, patches), ("c", 3, patches), ("evil", 4, outside)):
        import_adapter(tiny.make_adapter(base, root / f"adapter-{name}", seed=seed), base, where / name, task=name)
    (patches / "link").symlink_to(outside / "evil")
    sneaky = patches / "sneaky"
    sneaky.mkdir()
    for f in (outside / "evil").iterdir():
        if f.name == "adapter_model.safetensors":
            (sneaky / f.name).symlink_to(f)
        else:
            (sneaky / f.name).write_bytes(f.read_bytes())
    (outside / "mirror").mkdir()
    for f in (patches / "b").iterdir():
        (outside / "mirror" / f.name).symlink_to(f)
    return {"root": root, "base": base, "patches": patches, "outside": outside}


def launch(args, log_path, env=None):
    """`portllm serve ARGS --port 0` in its own process: (process, base URL, its start-up line). Its stderr
    goes to `log_path`, the rest of its stdout (uvicorn's access log) to `log_path` + ".out"."""
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "portllm.cli", "serve", *map(str, args), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
    )
    line = ""
    deadline = time.time() + 300
    while time.time() < deadline and "serving" not in line:
        line = proc.stdout.readline()
        if not line:
            break
    if "serving" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {Path(log_path).read_text()[-2000:]}")

    def drain(out=open(f"{log_path}.out", "w")):
        for text in proc.stdout:
            out.write(text)
            out.flush()

    threading.Thread(target=drain, daemon=True).start()
    url = line.split(" on ", 1)[1].split()[0].removesuffix("/v1").replace("0.0.0.0", "127.0.0.1")
    for _ in range(100):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url, line


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    """Two keys, runtime loading from the patch root, at most 3 patches, patch a given at start-up, the access
    log on. Yields (url, start-up line, log path)."""
    log = tmp_path_factory.mktemp("log") / "serve.log"
    args = ["--base", world["base"], "--served-name", "tiny", "--patch", f"a={world['patches'] / 'a'}",
            "--api-key", KEY, "--api-key", OTHER_KEY, "--allow-runtime-loading", "--patch-root", world["patches"],
            "--max-patches", "3", "--access-log"]  # fmt: skip
    proc, url, line = launch(args, log)
    yield url, line, log
    stop(proc)


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(url, path, body, headers=AUTH):
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


# ---------------------------------------------------------------- authentication


def test_every_path_but_health_needs_a_key(server):
    url, line, log = server
    assert httpx.get(url + "/health").status_code == 200  # load balancers' probes stay open
    for path in ("/v1/models", "/v1/models/a", "/openapi.json", "/docs", "/nosuch"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            err = error(httpx.get(url + path, headers=headers), 401)
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key", err
    r = httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "hi"}, headers={"Authorization": "Bearer x"})
    assert error(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    for key in (KEY, OTHER_KEY):
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} == {"tiny", "a"}
        assert client.completions.create(model="a", prompt="hello", max_tokens=2, temperature=0).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(url + "/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    logged = log.read_text() + Path(f"{log}.out").read_text()
    assert "GET /v1/models" in logged  # the access log is on, and shows no key
    assert KEY not in logged and OTHER_KEY not in logged and KEY not in line and "api keys: 2" in line


def test_a_key_from_the_environment_and_the_exposure_warning(world, tmp_path):
    """PORTLLM_API_KEY (comma-separated) when no --api-key; no key on a non-loopback address: a warning.
    The default server also refuses runtime loading (and so unloading)."""
    proc, url, line = launch(["--base", world["base"], "--patch", f"a={world['patches'] / 'a'}", "--host", "0.0.0.0"],
                             tmp_path / "open.log", env={"PORTLLM_API_KEY": ""})  # fmt: skip
    try:
        warned = (tmp_path / "open.log").read_text()
        assert "listening on 0.0.0.0 without --api-key: anyone who can reach the port can use it" in warned
        assert "runtime loading: off" in line
        path = str(world["patches"] / "b")
        err = error(post(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": path}, {}), 403)
        assert err["type"] == "permission_error" and "--allow-runtime-loading" in err["message"]
        assert error(post(url, "/v1/unload_lora_adapter", {"lora_name": "a"}, {}), 403)["code"] == "forbidden"
        assert httpx.get(url + "/v1/models").status_code == 200  # no key configured: open, as warned
    finally:
        stop(proc)
    env = {"PORTLLM_API_KEY": f" k-one , {KEY} ,"}
    proc, url, line = launch(["--base", world["base"]], tmp_path / "env.log", env=env)
    try:
        assert "without --api-key" not in (tmp_path / "env.log").read_text()
        assert "api keys: 2" in line and KEY not in line
        for key, status in (("k-one", 200), (KEY, 200), ("k-one , " + KEY, 401), ("k-one,", 401)):
            assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == status
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        stop(proc)


# ---------------------------------------------------------------- runtime loading


def test_paths_outside_the_root_and_missing_paths_get_the_same_403(world, server):
    url = server[0]
    patches, outside = world["patches"], world["outside"]
    refused = [
        str(outside / "evil"),  # a valid patch, absolute, outside the root
        str(outside / "mirror"),  # outside, though every file in it is a symlink into the root
        "../outside/evil",  # relative: taken from the root, `..` out of it
        str(patches / ".." / "outside" / "evil"),  # absolute with `..`
        str(patches / "link"),  # a symlink inside the root to a patch outside
        "link",
        str(patches / "sneaky"),  # a directory inside whose weights file is a symlink to one outside
        str(patches / "nosuch"),  # does not exist, inside the root
        "/nonexistent/patch",  # does not exist, outside
        "/etc",
        "",
    ]
    answers = [post(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": p}) for p in refused]
    bodies = {r.content for r in answers}
    assert [r.status_code for r in answers] == [403] * len(refused) and len(bodies) == 1, bodies
    assert error(answers[0], 403)["param"] == "lora_path"
    models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"]
    assert {m["id"] for m in models} == {"tiny", "a"}  # nothing loaded
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "b"})  # relative to the root: fine
    assert r.status_code == 200 and Path(r.json()["lora_path"]) == (patches / "b").resolve(), r.text
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 200


def test_patch_names_are_validated(world, server):
    url = server[0]
    path = str(world["patches"] / "b")
    for name in ("../../x", "a/b", "a\\b", "..", ".", "", "x" * 65, "naïve", "a b"):
        err = error(post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}), 400)
        assert err["param"] == "lora_name" and "[" not in err["message"], err
    ok = "v1.2_b-" + "x" * 57
    assert post(url, "/v1/load_lora_adapter", {"lora_name": ok, "lora_path": path}).status_code == 200
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": ok}).status_code == 200


def test_max_patches_and_start_up_patches_stay(world, server):
    url = server[0]
    for name in ("b", "c"):  # a + b + c = 3 = --max-patches
        assert post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": name}).status_code == 200
    err = error(post(url, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": "c"}), 400)
    assert err["code"] == "too_many_patches" and "at most 3" in err["message"]
    err = error(post(url, "/v1/unload_lora_adapter", {"lora_name": "a"}), 403)  # given at start-up
    assert "--allow-unload-startup-patches" in err["message"]
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    assert post(url, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": "c"}).status_code == 200
    for name in ("b", "d"):
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": name}).status_code == 200
    models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"]
    assert {m["id"] for m in models} == {"tiny", "a"}


def test_unloading_start_up_patches_when_allowed(world):
    """In process: --allow-unload-startup-patches lets a client unload them; runtime loading needs a root."""
    from fastapi.testclient import TestClient

    from portllm import PortLLMError
    from portllm.serve import Engine, EngineConfig, create_app
    from portllm.serve.security import ServerSecurity

    with pytest.raises(PortLLMError, match="--patch-root"):
        ServerSecurity(allow_runtime_loading=True)
    eng = Engine(world["base"], {"a": world["patches"] / "a"}, EngineConfig(), name="tiny")
    security = ServerSecurity(
        allow_runtime_loading=True, patch_roots=(world["patches"],), allow_unload_startup_patches=True
    )
    with TestClient(create_app(eng, security)) as http:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200
        assert "a" not in eng.patches


# ---------------------------------------------------------------- limits


def _raw(url, parts):
    """Send a request by hand (its head and body in parts, never finishing the body); the answer's status
    line, how long it took to come after the last part was sent, and the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as s:
        for p in parts:
            s.sendall(p)
        sent = time.monotonic()
        answer = s.recv(65536)
        waited = time.monotonic() - sent
        # the head and the body may come in separate packets: read on until the body is whole
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            more = s.recv(65536)
            if not more:
                break
            answer += more
        return answer.split(b"\r\n", 1)[0].decode(), waited, answer


def _length(answer):
    """The Content-Length an answer's head declares (0 when it declares none)."""
    found = re.search(rb"(?im)^content-length:\s*(\d+)", answer.split(b"\r\n\r\n", 1)[0])
    return int(found.group(1)) if found else 0


def test_oversized_bodies_get_413_without_being_read(server):
    url = server[0]
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n").encode()  # fmt: skip
    # a Content-Length of 50 MB with 1 KB actually sent: the answer comes at once, not after 50 MB
    status, waited, answer = _raw(url, [head + b"Content-Length: 50000000\r\n\r\n{" + b" " * 1023])
    assert status.startswith("HTTP/1.1 413 ") and waited < 5, (status, waited)
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_too_large" and "1048576" in body["error"]["message"]
    # a chunked body with no length: counted as it arrives, refused once past 1 MiB (never finished here:
    # 17 chunks of 64 KiB, the last one past the limit, and no terminating chunk)
    chunks = [b"10000\r\n" + b" " * 65536 + b"\r\n" for _ in range(17)]
    status, waited, _ = _raw(url, [head + b"Transfer-Encoding: chunked\r\n\r\n", *chunks])
    assert status.startswith("HTTP/1.1 413 ") and waited < 5, (status, waited)
    # an unauthenticated client's body is not read at all: 401 first
    status, _, _ = _raw(url, [head.replace(KEY.encode(), b"nope") + b"Content-Length: 50000000\r\n\r\n{"])
    assert status.startswith("HTTP/1.1 401 ")
    # under the limit is parsed as usual
    r = post(url, "/v1/completions", {"model": "a", "prompt": "x " * 1000, "max_tokens": 1, "user": " " * 900_000})
    assert error(r, 400)["code"] == "context_length_exceeded"


def test_context_overflow_names_both_numbers(server):
    url = server[0]
    prompt = "The movie was great and the actors were wonderful. " * 3
    ok = post(url, "/v1/completions", {"model": "a", "prompt": prompt, "max_tokens": 1, "temperature": 0})
    n = ok.json()["usage"]["prompt_tokens"]
    assert 10 < n < CONTEXT - 10, n
    asked = CONTEXT - n + 1
    err = error(post(url, "/v1/completions", {"model": "a", "prompt": prompt, "max_tokens": asked}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    msg = err["message"]
    assert f"{n} in the prompt" in msg and f"{asked} for the completion" in msg and f"is {CONTEXT} tokens" in msg
    assert post(url, "/v1/completions", {"model": "a", "prompt": prompt, "max_tokens": asked - 1}).status_code == 200
    messages = [{"role": "user", "content": prompt}]
    err = error(post(url, "/v1/chat/completions", {"model": "a", "messages": messages, "max_tokens": CONTEXT}), 400)
    assert err["code"] == "context_length_exceeded" and f"{CONTEXT} for the completion" in err["message"]


def test_seed_outside_64_bits_is_a_400(server):
    url = server[0]
    body = {"model": "a", "prompt": "hello", "max_tokens": 3, "temperature": 0.7}
    for seed in (2**70, 2**63, -(2**63) - 1):
        err = error(post(url, "/v1/completions", {**body, "seed": seed}), 400)
        assert err["param"] == "seed" and "Overflow" not in err["message"], err
    for seed in (2**63 - 1, -(2**63), 0):
        r = post(url, "/v1/completions", {**body, "seed": seed})
        assert r.status_code == 200, r.text
        assert post(url, "/v1/completions", {**body, "seed": seed}).json()["choices"] == r.json()["choices"]


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("completions", '{"model": "a", "prompt": "hi \\ud800", "max_tokens": 1}', "prompt"),
        ("completions", '{"model": "a", "prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt"),
        ("completions", '{"model": "\\ud800", "prompt": "hi", "max_tokens": 1}', "model"),
        ("completions", '{"model": "a", "prompt": "hi", "max_tokens": 1, "stop": ["\\ud83d"]}', "stop"),
        ("completions", '{"model": "a", "prompt": "hi", "max_tokens": 1, "\\ud800": 1}', None),  # a field's name
        ("chat/completions", '{"model": "a", "messages": [{"role": "user", "content": "\\ud800"}]}',
         "messages.0.content"),
        ("chat/completions", '{"model": "a", "messages": [{"role": "user", "content": "x", "name": "\\udc00"}]}',
         "messages.0.name"),
    ],
)  # fmt: skip
def test_text_that_is_not_unicode_is_a_400(server, path, body, param):
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer, template or UTF-8 answer takes: a 400 naming
    the field, never a 500 (the fuzz's strings never hold one). A pair that makes one character is fine."""
    url = server[0]
    r = httpx.post(f"{url}/v1/{path}", content=body.encode(), headers={**AUTH, "content-type": "application/json"})
    err = error(r, 400)
    assert err["param"] == param and ("Unicode" in err["message"] or "surrogate" in err["message"]), err
    pair = body.replace("\\ud800", "\\ud83d\\ude00")  # U+1F600, written as a surrogate pair
    if pair != body and param not in ("model", None):
        ok = httpx.post(f"{url}/v1/{path}", content=pair.encode(), headers={**AUTH, "content-type": "application/json"})
        assert ok.status_code == 200, ok.text


def test_an_error_that_quotes_a_lone_surrogate_is_still_sent():
    """An error message may quote what it refuses (a model or field name, a start-up patch name from argv, where
    undecodable bytes become lone surrogates): escaped, so the answer can be encoded (not a 500)."""
    import asyncio

    from portllm.serve.app import on_serve_error
    from portllm.serve.errors import UnknownModel

    r = asyncio.run(on_serve_error(None, UnknownModel("The model `\udcff` does not exist", param="\udcff")))
    err = json.loads(r.body)["error"]
    assert r.status_code == 404 and err["message"] == "The model `\\udcff` does not exist", err
    assert err["param"] == "\\udcff"


def test_internal_errors_carry_a_request_id_and_no_internals(world, caplog):
    """In process, with the failures forced: one raised in a handler, one on the engine's worker (plain and
    streamed). The client gets the request id only; the log has what happened, under the same id."""
    from fastapi.testclient import TestClient

    from portllm.serve import Engine, EngineConfig, create_app

    secret = "secret-detail-/etc/shadow"
    eng = Engine(world["base"], {"a": world["patches"] / "a"}, EngineConfig(), name="tiny")
    body = {"model": "a", "prompt": "hello", "max_tokens": 2}
    with TestClient(create_app(eng), raise_server_exceptions=False) as http:
        ok = http.post("/v1/completions", json=body)
        assert ok.status_code == 200 and len(ok.headers["x-request-id"]) == 16
        eng.submit = lambda request: (_ for _ in ()).throw(RuntimeError(secret))  # a bug behind a handler
        try:
            r = http.post("/v1/completions", json=body)
        finally:
            del eng.submit
        failed = [r]
        registry = eng.registry
        adapter_names = registry.adapter_names
        registry.adapter_names = lambda adapters: (_ for _ in ()).throw(ValueError(secret))  # on the worker
        try:
            failed.append(http.post("/v1/completions", json=body))
            streamed = http.post("/v1/completions", json={**body, "stream": True})
        finally:
            registry.adapter_names = adapter_names
    for r in failed:
        err = error(r, 500)
        rid = r.headers["x-request-id"]
        assert err == {"message": f"internal error (request id {rid})", "type": "server_error", "param": None,
                       "code": None}, err  # fmt: skip
        assert secret not in r.text
        assert any(rid in rec.getMessage() and secret in rec.getMessage() + str(rec.exc_info) for rec in caplog.records)
    assert streamed.status_code == 200 and secret not in streamed.text
    events = [json.loads(x[6:]) for x in streamed.text.split("\n\n") if x.startswith("data: {")]
    rid = streamed.headers["x-request-id"]
    assert events[-1]["error"]["message"] == f"internal error (request id {rid})", events


# ---------------------------------------------------------------- --engine vllm


def test_vllm_engine_gets_the_options_it_has(world, tmp_path):
    fake = tmp_path / "vllm"
    fake.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {tmp_path}/argv\n'
        f'printf "%s\\n" "key=$VLLM_API_KEY" "runtime=$VLLM_ALLOW_RUNTIME_LORA_UPDATING" > {tmp_path}/env\n'
    )
    fake.chmod(0o755)
    base = ["serve", "--base", world["base"], "--patch", f"a={world['patches'] / 'a'}", "--engine", "vllm",
            "--vllm-dir", tmp_path / "mods"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", PORTLLM_VLLM=str(fake), PORTLLM_API_KEY="")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "portllm.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300)  # fmt: skip

    r = cli(*base, "--api-key", KEY, "--dtype", "bfloat16", "--max-batch", "8", "--max-patches", "4",
            "--max-lora-rank", "32", "--allow-runtime-loading")  # fmt: skip
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "argv").read_text().split("\n")
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert pairs["--dtype"] == "bfloat16" and pairs["--max-num-seqs"] == "8"
    assert pairs["--max-loras"] == "4" and pairs["--max-lora-rank"] == "32"
    assert KEY not in argv  # one key: in VLLM_API_KEY, not on a command line other users can read
    assert (tmp_path / "env").read_text().split("\n")[:2] == [f"key={KEY}", "runtime=True"]
    assert KEY not in r.stdout + r.stderr and "VLLM_API_KEY=<hidden>" in r.stdout
    assert "vLLM loads a runtime lora_path from anywhere" in r.stderr

    r = cli(*base, "--api-key", KEY, "--api-key", OTHER_KEY)  # several keys: vLLM's --api-key list
    argv = (tmp_path / "argv").read_text().split("\n")
    assert r.returncode == 0 and argv[argv.index("--api-key") + 1 :][:2] == [KEY, OTHER_KEY], r.stderr
    assert KEY not in r.stdout + r.stderr and "--api-key '<hidden>' '<hidden>'" in r.stdout

    r = cli(*base, "--router", "description", "--max-queue", "4", "--request-timeout", "9", "--threads", "2",
            "--access-log", "--patch-root", tmp_path, "--allow-unload-startup-patches", "--max-body-bytes", "10",
            "--device", "cpu", "--port", "0")  # fmt: skip
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert lines[0].endswith(
        "no equivalent for --router, --max-queue, --request-timeout, --threads, --access-log, --patch-root, "
        "--allow-unload-startup-patches, --max-body-bytes, --device, --port 0: drop them or use --engine portllm"
    ), lines
    r = cli(*base, "--dtype", "fp8")
    assert r.returncode != 0 and "--dtype 'fp8': use auto, float32, bfloat16, float16" in r.stderr, r.stderr

    # no key on a network address: warned; the warning and the written modules' paths printed literally
    mods = tmp_path / "mods[bold]x[/bold]"
    r = cli(*base[:-2], "--vllm-dir", mods, "--host", "[::]", "--dtype", " BFloat16")
    argv = (tmp_path / "argv").read_text().split("\n")
    assert r.returncode == 0 and argv[argv.index("--dtype") + 1] == "bfloat16", r.stderr
    assert "listening on [::] without --api-key: anyone who can reach the port can use it" in r.stderr
    assert f"checked and written a -> {mods / 'a'}" in r.stdout, r.stdout


# ---------------------------------------------------------------- fuzz: the server's own OpenAPI schema


FUZZ_EXAMPLES = 80  # per operation with inputs and generation mode (valid, invalid): ~700 requests, ~30 s


def test_fuzz_the_openapi_schema_finds_no_5xx(server):
    """Every operation the server publishes, with bodies generated from its own schema (valid ones and
    invalid ones), sent with the key: no answer may be a 5xx. `model` is drawn from the served names so
    that valid bodies reach the engine."""
    schemathesis = require_module("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    url = server[0]
    spec = httpx.get(url + "/openapi.json", headers=AUTH).json()
    for name in ("CompletionRequest", "ChatRequest"):
        spec["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": ["tiny", "a"]}
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    sent, failures, impossible = [], [], []
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    limits = settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    def fuzz(op, mode):
        @limits
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            r = case.call(base_url=url, headers=AUTH, timeout=60)
            sent.append((op.label, mode.value, r.status_code))
            if r.status_code >= 500:
                failures.append(f"{r.status_code} {r.text[:200]}\n{case.as_curl_command(headers=AUTH)}")

        try:
            run()
        except Unsatisfiable:  # no invalid value exists (a path parameter that takes any string): said, not skipped
            if mode is modes[0]:
                raise
            impossible.append(op.label)

    for op in operations:
        has_inputs = any(len(x) for x in (op.path_parameters, op.query, op.headers, op.cookies, op.body))
        for mode in modes if has_inputs else modes[:1]:  # nothing to make invalid in `GET /v1/models`
            fuzz(op, mode)
    assert impossible == ["GET /v1/models/{model_id}"], impossible  # any string is a valid model id
    by_op = {op.label: sum(1 for label, *_ in sent if label == op.label) for op in operations}
    assert len(sent) >= 500 and all(n >= FUZZ_EXAMPLES // 2 for n in by_op.values() if n > 1), by_op
    assert by_op["POST /v1/completions"] >= FUZZ_EXAMPLES and by_op["POST /v1/chat/completions"] >= FUZZ_EXAMPLES
    assert not failures, f"{len(failures)} of {len(sent)} requests got a 5xx:\n" + "\n".join(failures[:5])
    answered = {(label, status) for label, _, status in sent}
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):  # bodies reached the engine and were refused
        assert (label, 200) in answered and (label, 400) in answered, sorted(answered)


def test_library_callers_get_the_seed_range_too():
    """A seed outside int64 is refused before it reaches the worker (the HTTP schema is not the only gate)."""
    from portllm.serve.sampling import SamplingParams
    from portllm.serve.security import SEED_MAX, SEED_MIN

    assert SamplingParams(seed=SEED_MAX).problem() is None and SamplingParams(seed=SEED_MIN).problem() is None
    for bad in (2**70, SEED_MAX + 1, SEED_MIN - 1):
        assert SamplingParams(seed=bad).problem()[0] == "seed"
