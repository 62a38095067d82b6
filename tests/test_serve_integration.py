"""`portllm serve` on the real embedded SmolLM2-135M with a real LoRA patch, through the `openai` client."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import require_module

pytestmark = pytest.mark.integration

openai = require_module("openai")
httpx = require_module("httpx")
require_module("fastapi")


@pytest.fixture(scope="module")
def smol_patch(tmp_path_factory):
    """A rank-8 LoRA on every projection of SmolLM2 with non-zero B (as test_integration_smollm2), imported."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from portllm import import_adapter, resolve_base

    root = tmp_path_factory.mktemp("smol-serve")
    model = AutoModelForCausalLM.from_pretrained(resolve_base("smollm2-135m"))
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    pm.save_pretrained(root / "adapter")
    import_adapter(root / "adapter", "smollm2-135m", root / "patch", task="demo")
    return root / "patch"


def test_smollm2_server_serves_base_and_patch(smol_patch, tmp_path):
    from portllm.eval import generate, open_lm
    from test_serve import start_server, stop_server

    prompts = ["The capital of France is", "Question: Is the sky blue? Answer:"]
    want = {
        name: generate(open_lm("smollm2-135m", patch), prompts, max_new_tokens=8, batch_size=1)[0]
        for name, patch in (("smollm2-135m", None), ("demo", smol_patch))
    }
    assert want["smollm2-135m"] != want["demo"]
    proc, url = start_server(["--base", "smollm2-135m", "--patch", f"demo={smol_patch}"], tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        assert {m.id for m in client.models.list().data} == {"smollm2-135m", "demo"}
        jobs = [(m, p) for m in want for p in prompts]

        def run(job):
            r = client.completions.create(model=job[0], prompt=job[1], max_tokens=8, temperature=0)
            return r.choices[0].text

        assert [run(j) for j in jobs] == [want[m][prompts.index(p)] for m, p in jobs]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(run, jobs)) == [want[m][prompts.index(p)] for m, p in jobs]

        chat = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0
        )
        assert chat.choices[0].message.content.strip() and chat.usage.prompt_tokens > 10  # the template was applied

        # a client that goes away mid-stream: its row leaves the batch instead of generating 2000 tokens (minutes)
        body = {"model": "demo", "prompt": "Once", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
        health = url.removesuffix("/v1") + "/health"
        for _ in range(100):
            h = httpx.get(health).json()
            if h["cancelled"] and not h["running"]:
                break
            time.sleep(0.1)
        assert h["cancelled"] == 1 and h["running"] == 0
    finally:
        stop_server(proc)
