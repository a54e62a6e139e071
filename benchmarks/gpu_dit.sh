#!/usr/bin/env bash
# benchmarks/dit_scale.py at FLUX.1-dev's full depth (19 double + 38 single blocks, T5-XXL's 24 layers,
# 1,024 px) on one CUDA GPU, random weights; about 3 minutes on an H200, cut off at 7.5.
#
# Carry .whl/ (ignored by git) with: diffusers-*.whl, the wheels of the packages below that the machine
# lacks (requests, urllib3, charset-normalizer, certifi, idna: diffusers imports requests), and CLIP's
# tokenizer files in .whl/clip-bpe/ (vocab.json and merges.txt, a copy of ~/.cache/workbench/clip-bpe:
# the GPU machine cannot derive them, it has no network). The table is printed and, when $OUT is set,
# written to $OUT/dit_scale.md (after every row) with the whole log in $OUT/dit_scale.log.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .whl/clip-bpe/vocab.json ] && [ -f .whl/clip-bpe/merges.txt ]; then
    mkdir -p /tmp/workbench-cache && cp -r .whl/clip-bpe /tmp/workbench-cache/
    export WORKBENCH_CACHE=/tmp/workbench-cache
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 - <<'PY' || exit 1
import torch, transformers, diffusers
print("torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)
try:
    import workbench.flux_shaped, workbench.methods  # noqa: F401
except ImportError as e:
    raise SystemExit(f"workbench does not import, a wheel is missing: {e}")
from workbench.sd14 import clip_tokenizer_files
try:
    clip_tokenizer_files()
except RuntimeError as e:
    raise SystemExit(f"no CLIP tokenizer files, carry .whl/clip-bpe/: {e}")
PY
log=/dev/null
[ -n "${OUT:-}" ] && log="$OUT/dit_scale.log"
timeout "${DIT_TIMEOUT:-450}" python3 benchmarks/dit_scale.py --device cuda --dtype bfloat16 --double 19 --single 38 --t5-layers 24 \
    --size 1024 --prompts 10 ${OUT:+--out "$OUT/dit_scale.md"} 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "cut off after ${DIT_TIMEOUT:-450} s: the rows above are those that finished"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
exit "$rc"
