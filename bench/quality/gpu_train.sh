#!/usr/bin/env bash
# Train the quality benchmark's role adapters on the lent GPU (`device` tool), in two consecutive calls, because the
# 98 MB SmolLM2 GGUF is larger than one call's carry (see ../shared/gpu/README.md):
#   here:   G=$(.venv/bin/python -c "from sglang_forkkv.model_prep import gguf_path; print(gguf_path())")
#           mkdir -p .q1 .q2 && split -b 49200000 -d "$G" .q1/gguf.part && mv .q1/gguf.part01 .q2/
#           cp .gpu/whl/gguf-*.whl .q2/      # (.q1/ and .q2/ listed in .git/info/exclude)
#   call 1: bash bench/quality/gpu_train.sh stash .q1          carry [".q1"]
#   call 2: bash bench/quality/gpu_train.sh train .q2 [train.py options]        carry [".q2"]   (within 30 s: the
#           machine stays warm); ROLES="extract count" picks the roles (default all three)
# Each role trains in its own process, side by side (the 135M model leaves the GPU mostly idle in one), and writes
# $OUT/<role>/<role>/ (the adapter), $OUT/<role>/train_log.json and $OUT/train-<role>.log. A later call on the warm
# machine reuses the converted model (carry nothing).
set -euo pipefail
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
phase=$1 dir=$2
case "$phase" in
stash)
    mkdir -p /tmp/persist && cp "$dir"/gguf.part00 /tmp/persist/ && echo "stashed part 0" ;;
train)
    export PYTHONPATH="/tmp/q/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    if [ ! -f /tmp/q/model/config.json ]; then
        mkdir -p /tmp/q/gguf
        cat /tmp/persist/gguf.part00 "$dir"/gguf.part01 > /tmp/q/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
        echo "$GGUF_SHA256  /tmp/q/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
        python3 -m pip install -q --no-index --no-deps --target /tmp/q/site "$dir"/gguf-*.whl
        python3 -c "from pathlib import Path; from sglang_forkkv.model_prep import _convert
_convert(Path('/tmp/q/gguf/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('/tmp/q/model'), 'bfloat16')"
    fi
    for role in ${ROLES:-extract count check}; do
        python3 bench/quality/train.py --model /tmp/q/model --out "$OUT/$role" --roles "$role" "${@:3}" \
            > "$OUT/train-$role.log" 2>&1 &
    done
    wait
    tail -n 4 "$OUT"/train-*.log ;;
*)
    echo "usage: $0 stash|train DIR [train.py options]" >&2; exit 2 ;;
esac
