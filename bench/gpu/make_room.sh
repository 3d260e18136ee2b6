#!/usr/bin/env bash
# Make room in the GPU wheelhouse: replace the real xgrammar wheel (12.7 MiB) by a raise-on-use stand-in (~3 KiB).
#   usage (repo root, after `bash ../shared/gpu/wheelhouse.sh .gpu`):  bash bench/gpu/make_room.sh [GPU_DIR=.gpu]
#
# Why: a device call carries the tracked + untracked-not-ignored files + .gpu, at most 64 MiB (67,108,864 bytes).
# The shared wheelhouse alone is ~61 MiB (.gpu with the overlay: 63,976,610 bytes), and the project tree was ~6 MB
# with the three trained LoRA adapters of bench/quality/adapters, so a call carrying .gpu was refused.
# What: SGLang 0.5.17 imports xgrammar at module level on the server's start-up path (function_call/inkling_detector.py,
# kimik3_detector.py, kimik3_structural_tag.py unguarded; base_format_detector.py and entrypoints/openai/protocol.py
# guarded) but uses it only for grammar-constrained decoding (json_schema/regex/ebnf/structural_tag requests and
# constrained tool calls). bench/gpu/xgrammar_stub/xgrammar lets every `from xgrammar[.structural_tag] import X`
# succeed (X: a placeholder class, fine as annotation, base class or pydantic Union member) and raises XGrammarStubbed
# ("xgrammar is stubbed in the forkkv GPU wheelhouse ... --grammar-backend none") on any call, instantiation or
# attribute use. Start GPU servers with `--grammar-backend none`; with --skip-tokenizer-init (bench/e2e.py's
# GPU_FLAGS) SGLang creates no grammar backend anyway, and with the default backend and a tokenizer SGLang logs the
# stub message ("Grammar backend disabled ...") and falls back to none (checked on the CPU).
# How to rebuild: wheelhouse.sh rewrites .gpu/whl/*.whl from scratch (the real xgrammar comes back), so rerun this
# script after it, every time. Idempotent: it removes .gpu/whl/xgrammar-*.whl (real or stub) and builds
# xgrammar-0.2.1+forkkvstub-py3-none-any.whl with ../shared/gpu/trim_wheel.py stub; nothing else in .gpu is touched.
# device-setup.sh keys its /tmp/site stamp on the wheel names and sizes, so a warm machine reinstalls by itself.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
gpu=${1:-.gpu}
shared=${SHARED_GPU:-$root/../shared/gpu}
version=0.2.1+forkkvstub
max=67108864

ls "$gpu"/whl/sglang-[0-9]*.whl >/dev/null 2>&1 || { echo "no $gpu/whl/sglang-*.whl: run bash ../shared/gpu/wheelhouse.sh $gpu first" >&2; exit 1; }
before=$(du -sb "$gpu" | cut -f1)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# only the package folder goes in (no __pycache__: trim_wheel.py skips .pyc and __pycache__)
python3 "$shared/trim_wheel.py" stub bench/gpu/xgrammar_stub xgrammar "$version" "$tmp"
whl=$(ls "$tmp"/xgrammar-*.whl)
# the device installs with exactly this; check the stub installs and imports before it replaces anything
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$whl"
PYTHONPATH=$tmp/site python3 -c "
import xgrammar as x
from xgrammar import StructuralTag
from xgrammar.structural_tag import Format
assert x.__version__ == '$version' and x.__file__.startswith('$tmp/site'), x.__file__
try: StructuralTag()
except x.XGrammarStubbed: pass
else: raise SystemExit('stub did not raise')"

for f in "$gpu"/whl/xgrammar-*.whl; do [[ -e $f ]] && echo "removing $(basename "$f") ($(stat -c%s "$f") bytes)"; done
rm -f "$gpu"/whl/xgrammar-*.whl
mv "$whl" "$gpu/whl/"

after=$(du -sb "$gpu" | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
echo "$gpu: $before -> $after bytes ($(awk -v b="$after" 'BEGIN {printf "%.2f", b / 2^20}') MiB)"
echo "carry estimate: tree $tree + $gpu $after = $((tree + after)) of $max bytes ($((max - tree - after)) left)"
