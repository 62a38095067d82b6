"""--device / --dtype: resolved in one place; an absent device is a one-line error, never a CPU fallback."""

import pytest
import torch

from portllm import device as dev
from portllm.errors import PortLLMError


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend torch sees `n` GPUs with `free` bytes free each (nothing is allocated)."""

    def make(n: int, free: int = 10 * 2**30, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free, 2 * free))

    return make


def test_cpu_and_auto_without_a_gpu(fake_gpus):
    fake_gpus(0)
    assert dev.resolve_device("cpu") == "cpu"
    assert dev.resolve_device("auto") == "cpu"
    assert dev.place("auto", "auto") == dev.Placement("cpu", "float32", False)
    assert dev.resolve_dtype("bfloat16", "cpu") == "bfloat16"  # asked for: kept


def test_absent_cuda_is_a_one_line_error(fake_gpus):
    fake_gpus(0)
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(PortLLMError) as e:
            dev.resolve_device(spec)
        msg = str(e.value)
        assert "\n" not in msg and "--device cpu" in msg and spec in msg


def test_unknown_names_are_refused():
    for bad in ("gpu", "cuda:x", "tpu", "cuda:-1"):
        with pytest.raises(PortLLMError, match="--device"):
            dev.resolve_device(bad)
    with pytest.raises(PortLLMError, match="--dtype"):
        dev.resolve_dtype("fp8", "cpu")


def test_auto_on_gpus(fake_gpus):
    fake_gpus(2)
    assert dev.resolve_device("auto") == "cuda:0"
    assert dev.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(PortLLMError, match=r"only 2 CUDA device\(s\)"):
        dev.resolve_device("cuda:2")
    assert dev.resolve_dtype("auto", "cuda:0") == "bfloat16"
    fake_gpus(1, bf16=False)
    assert dev.resolve_dtype("auto", "cuda:0") == "float16"


def test_spread_only_when_one_gpu_cannot_hold_the_weights(fake_gpus):
    fake_gpus(2, free=4 * 2**30)
    assert not dev.place("cuda", "bfloat16", weight_bytes=2 * 2**30).spread
    assert dev.place("cuda", "bfloat16", weight_bytes=8 * 2**30).spread
    assert dev.place("auto", "auto", weight_bytes=8 * 2**30).spread
    assert not dev.place("cuda:1", "bfloat16", weight_bytes=8 * 2**30).spread  # a named GPU is that GPU
    fake_gpus(1, free=4 * 2**30)
    assert not dev.place("cuda", "bfloat16", weight_bytes=8 * 2**30).spread  # nothing to spread over


def test_weight_bytes_counts_elements_times_size():
    shapes = [(3, 5), (7,), (2, 2, 2)]
    n = 15 + 7 + 8
    assert dev.weight_bytes(shapes, "float32") == 4 * n
    assert dev.weight_bytes(shapes, "bfloat16") == 2 * n


def test_the_gpu_batch_budget_is_what_fits_in_half_the_free_memory():
    """budget_for turns a measured cost per token into padded tokens per batch: half the free memory, within
    GPU_BUDGET_RANGE; the CPU keeps its cache-sized budget, a device torch cannot ask for free memory (mps) a
    fixed one, and an explicit --max-tokens always wins."""
    from portllm.eval import pack

    assert pack.budget_for(10e9, 1e5) == 50_000
    assert pack.budget_for(10e9, 2e5) == 25_000  # twice the cost per token: half the tokens
    assert pack.budget_for(1e6, 1e5) == pack.GPU_BUDGET_RANGE[0]
    assert pack.budget_for(1e15, 1.0) == pack.GPU_BUDGET_RANGE[1]
    assert pack.token_budget(None, torch.device("cpu"), object()) == pack.CPU_BATCH_TOKENS
    assert pack.token_budget(None, torch.device("mps")) == pack.ACCELERATOR_BATCH_TOKENS
    assert pack.token_budget(300, torch.device("cuda")) == 300


def test_the_cuda_budget_is_measured_once_per_model(monkeypatch):
    """On CUDA the cost per token comes from one probe forward pass (peak memory it adds / PROBE_TOKENS), then the
    budget is cached for that model; simulated here with torch.cuda's memory queries replaced."""
    from portllm.eval import pack

    calls = []

    class Model:
        def __call__(self, input_ids, use_cache):
            calls.append(input_ids.shape)

    peak = {"v": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: peak.update(v=1_000))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 1_000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 1_000 + 256 * 40_000)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (8e9, 16e9))
    monkeypatch.setattr(torch, "zeros", lambda shape, dtype, device: torch.ones(shape, dtype=dtype))
    m = Model()
    assert pack.token_budget(None, torch.device("cuda"), m) == pack.budget_for(8e9, 40_000) == 100_000
    assert pack.token_budget(None, torch.device("cuda"), m) == 100_000 and calls == [(1, pack.PROBE_TOKENS)]


def test_a_study_trains_in_bf16_only_where_the_device_runs_it_natively(monkeypatch):
    """On a CPU without AMX or AVX512-BF16 torch emulates bf16 (over 8x slower than fp32 on the 2-core AVX2 box):
    `bfloat16-if-native` is fp32 there and bf16 where it is native; an explicit dtype is kept as asked."""
    import torch

    for amx, avx512_bf16, want in ((False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        assert dev.training_dtype(dev.BF16_IF_NATIVE, "cpu") == want, (amx, avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert dev.training_dtype("bfloat16", "cpu") == "bfloat16"  # asked for: kept
    assert dev.training_dtype(dev.BF16_IF_NATIVE, "mps") == "float32"


def test_the_sweep_and_the_reproduction_record_the_concrete_training_dtype(monkeypatch, tmp_path):
    import torch

    import tiny
    from portllm.reproduce.profiles import PROFILES
    from portllm.sweep import PLANS
    from portllm.sweep.run import SweepContext

    assert PLANS["full"].dtype == dev.BF16_IF_NATIVE and all(p.dtype == dev.BF16_IF_NATIVE for p in PROFILES.values())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    said: list[str] = []
    base = tiny.make_base(tmp_path / "base")
    ctx = SweepContext.open(PLANS["pilot"], str(base), tmp_path, tmp_path / "c", said.append, False)
    assert ctx.plan.dtype == "float32" and ctx.train_config(ctx.plan.tasks["sst2_heldout"], 0).dtype == "float32"
    assert any("bf16 is not native on cpu" in m and "float32" in m for m in said)
    import portllm.reproduce.run as rr

    class Stop(Exception):
        pass

    def evolve_base(ctx, base, timings):
        said.append(f"profile trains in {ctx.prof.dtype}")
        raise Stop

    monkeypatch.setattr(rr, "evolve_base", evolve_base)
    with pytest.raises(Stop):
        rr.reproduce(str(base), "quick", out=tmp_path / "out", data=tmp_path, cache=tmp_path / "rc", log=said.append,
               device="cpu")  # fmt: skip
    assert said[-1] == "profile trains in float32" and "bf16 is not native on cpu" in said[-2]
