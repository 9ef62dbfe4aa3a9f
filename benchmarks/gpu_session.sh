#!/usr/bin/env bash
# One device-machine session of the GPU benchmarks (bench_gpu.py), sized for a 15-minute lease:
#   device run, carry [".devcarry"] (holds vocab.txt), command: bash benchmarks/gpu_session.sh
# Each part has its own timeout and writes its JSON under $OUT as soon as it ends.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
VOCAB=(--vocab .devcarry/vocab.txt)
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python3 -c "import torch, transformers, timm; print(torch.__version__, transformers.__version__, timm.__version__)"
bench() {  # name, timeout seconds, bench_gpu.py arguments...
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS
  timeout "$limit" python3 benchmarks/bench_gpu.py "${VOCAB[@]}" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "== $name: exit $? after $((SECONDS - began)) s"
}
bench capfilt_eager 150 --parts capfilt --peaked-logits --capfilt-batches 512,1024 --capfilt-images 1024
bench pretrain_eager 100 --parts pretrain --pretrain-batch 256
bench pretrain_compiled 280 --parts pretrain --pretrain-batch 256 --compile
bench retrieval_eager 120 --parts retrieval
# The last line of each file is the end of its indented JSON; print the compact figures.
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    text = path.read_text()
    start = text.rfind("\n{\n")
    try:
        data = json.loads(text[start + 1:] if start >= 0 else text)
    except ValueError:
        print(path.name, "no JSON;", (path.with_suffix(".err").read_text()[-1500:])); continue
    for part in ("capfilt", "pretrain", "retrieval"):
        if part in data:
            d = data[part]
            keep = d if part == "retrieval" else {k: d.get(k) for k in ("images_per_s_per_gpu", "ours", "where_time_goes", "gpu_busy_fraction",
                    "baseline", "ratio_vs_baseline_same_batch", "samples_per_s", "mfu", "achieved_tflops",
                    "model_tflop_per_step", "time_split", "warmup_s", "max_memory_gib", "compiled") if k in d}
            print(path.name, json.dumps(keep))
PY
