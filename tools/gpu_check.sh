#!/usr/bin/env bash
# A GPU machine's check before a long run, in under 10 minutes on one GPU: bench.py's smoke (NTP,
# CoCoMix with cached and online labels, labelling eager and compiled) at the paper's shapes
# (config/cocomix_gpt2.py), compiled, in bfloat16 and in float16; the chunked heads' gradients
# against the plain ones' (float16 against a float32 reference); 2 processes under torchrun when
# there are 2 GPUs. The last line is the one verdict: "gpu_check: OK ..." or "gpu_check: FAILED ...".
#
#   bash tools/gpu_check.sh         # on the GPU machine
#   bash tools/gpu_check.sh --cpu   # the same steps, every shape tiny, on a CPU (the tests)
cd "$(dirname "$0")/.." || exit 1
if [ "$1" = --cpu ]; then  # aot_eager: the compiled path without inductor's minutes of C++ builds
    args=(--smoke_tiny=True --device=cpu --backend=aot_eager --steps=2)
    dtypes=(bfloat16) limit=150 gpus=0
else
    args=() dtypes=(bfloat16 float16) limit=270
    gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
passed=() failed=()
joined() { local IFS=','; echo "$*" | sed 's/,/, /g'; }
step() {  # NAME COMMAND...: run it under the time limit, its output shown, its result kept
    local name=$1
    shift
    echo "== $name: $*"
    if timeout "$limit" "$@"; then passed+=("$name"); else failed+=("$name (exit $?)"); fi
}
for dtype in "${dtypes[@]}"; do  # heads: float16's gradients are the ones at risk of underflow
    step "smoke $dtype" python tools/bench.py --parts=smoke,heads config/cocomix_gpt2.py \
        --compile=True --dtype="$dtype" "${args[@]}"
done
if [ "$gpus" -ge 2 ]; then
    step "torchrun x2" torchrun --standalone --nproc_per_node=2 tools/bench.py --parts=smoke \
        config/cocomix_gpt2.py --compile=True --dtype=bfloat16 "${args[@]}"
else
    skipped="; torchrun skipped ($gpus GPUs)"
fi
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: OK ($(joined "${passed[@]}")$skipped)"
else
    echo "gpu_check: FAILED: $(joined "${failed[@]}"); passed: $(joined "${passed[@]:-none}")$skipped"
    exit 1
fi
