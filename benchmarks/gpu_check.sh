#!/usr/bin/env bash
# One-shot check of the CUDA paths on a lent GPU machine (one NVIDIA H100/H200), run once:
#
#   bash benchmarks/gpu_check.sh                 # GPU run: expected 3-4 min (estimate), capped below 8 min
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # output elsewhere (default ./gpu_check_out)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh       # the CPU dry run below, even where CUDA is present
#
# Steps, in order; each logs to $OUT/logs/<step>.log, a failing step does not stop the next ones:
#   device         card, driver, torch, CUDA, cuDNN           -> $OUT/device.txt, $OUT/device.json
#   pytest_gpu     python -m pytest -q tests/test_gpu.py      (skips on a machine without CUDA)
#   compare        every rule (bp bp_fc_only fa kp dfa dkp drtp) a few steps on CUDA vs the CPU,
#                  final parameters within rtol 1e-3 / atol 1e-4 -> $OUT/compare.json (max abs diff per rule)
#   bench_*        parallel-dkp bench of bp,bp_fc_only,dfa,dkp on one GPU: conv2 batch 128 and 1024,
#                  alexnet_small (synthetic 3x32x32, 100 classes) batch 256 -> $OUT/bench_<model>_b<batch>.json
#   unlocking_*    parallel-dkp bench --ranks 1 on convdeep and vit (synthetic 1x28x28): the one-device part of
#                  the unlocking benchmark and the cost model's per-block calibration -> $OUT/unlocking_<model>.json
#   memory_*       torch.cuda.max_memory_allocated after a few steps of every rule, conv2 batch 1024 and
#                  alexnet_small batch 256 -> $OUT/memory_<model>_b<batch>.json
# Then $OUT/summary.txt: mode, card, commit and one line per step "<step> PASS|FAIL|SKIP <seconds>s".
# Exit status 0 only if every step passed.
#
# Without CUDA (torch.cuda.is_available() false), or with DRY_RUN=1, the same steps run as a SHORT
# CPU dry run (about 50 s on 2 idle CPU cores): synthetic data, tiny batches (conv2 32 and 64,
# alexnet_small 8), 2 timed steps after 1 warm-up, compare is CPU vs CPU (equal by construction,
# but the code path runs), peak memory is "n/a". With DRY_RUN=1 on a GPU machine the GPUs are
# hidden (CUDA_VISIBLE_DEVICES=) from every step but nvidia-smi. tests/test_gpu_check.py runs it.
#
# conv2 runs on real Fashion-MNIST (configs/default.toml, first 2048 images) where its IDX files are
# found, otherwise on synthetic 1x28x28 data of the same shape (step time does not depend on pixel
# values; the bench JSON's "data" field says which). OMP_NUM_THREADS is left as it is.
#
# Needs the project's dependencies importable (PYTHONPATH is set to this checkout; the lent machines'
# image had torch, rich and accelerate but not tomli_w on 2026-11-28: carry it as a wheel there).
# GPU numbers go into docs/ (docs/results.md) with the card's name from $OUT/device.json
# (device_name, driver) and the torch/CUDA versions next to them; dry-run numbers mean nothing.
set -uo pipefail

OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # works from the checkout even if not pip-installed
py=${PYTHON:-python}
budget_s=${BUDGET_S:-450}  # seconds for all steps: with start-up and kill grace, under 8 minutes in all

cuda=$("$py" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null || echo False)
if [[ "${DRY_RUN:-0}" == "1" || "$cuda" != "True" ]]; then
  mode=dry-run
  [[ "$cuda" == "True" ]] && export CUDA_VISIBLE_DEVICES=  # forced dry run: keep every step on the CPU
  device=cpu
  steps=(--steps 2 --warmup 1)
  mem_steps=2
  conv2_data=(--set data.name=synthetic --set "data.synthetic_shape=[1, 28, 28]" --set data.synthetic_size=256)
  conv2_small=32 conv2_large=64
  alex_size=16 alex_batch=8
  limits=(60 120 120 120 120 120 120 120 120 120)
  balanced_sizes=(--set "data.synthetic_shape=[1, 8, 8]" --set data.synthetic_size=64 --set data.batch_size=16
                  --set model.width=4 --set model.dim=8 --set model.heads=2 --set model.patch=2 --set model.depth=2)
else
  mode=gpu
  device=cuda
  steps=(--steps 50 --warmup 10)
  mem_steps=3
  # the package's own lookup (data.root empty: Debian's folder, then ~/.cache/parallel_dkp)
  if "$py" -c 'from parallel_dkp.config import load_config; from parallel_dkp.data.idx import locate
locate(load_config("configs/default.toml").data)' >/dev/null 2>&1; then
    conv2_data=(--set data.train_limit=2048 --set data.test_limit=128)
  else
    conv2_data=(--set data.name=synthetic --set "data.synthetic_shape=[1, 28, 28]" --set data.synthetic_size=2048)
  fi
  conv2_small=128 conv2_large=1024
  alex_size=2048 alex_batch=256
  # seconds per step: device, pytest_gpu, compare, 3 x bench, 2 x memory (the budget caps the sum)
  limits=(60 240 120 90 90 120 90 120 90 90)
  balanced_sizes=(--set "data.synthetic_shape=[1, 28, 28]" --set data.synthetic_size=1024)
fi
alex=(--config configs/alexnet_small_cifar100.toml --set data.name=synthetic --set "data.synthetic_shape=[3, 32, 32]"
      --set data.synthetic_classes=100 --set "data.synthetic_size=$alex_size" --set model.name=alexnet_small
      --set "data.batch_size=$alex_batch")
conv2=(--config configs/default.toml "${conv2_data[@]}" --set run.progress=false)
bench_rules=bp,bp_fc_only,dfa,dkp

summary="$OUT/summary.txt"
start_all=$EPOCHREALTIME
failed=0
results=()

# run_step NAME LIMIT_S COMMAND...: the command's stdout and stderr go to $OUT/logs/NAME.log.
run_step() {
  local name=$1 limit=$2 rc t0 secs elapsed left status note
  shift 2
  elapsed=$(awk -v a="$start_all" -v b="$EPOCHREALTIME" 'BEGIN { printf "%d", b - a }')
  left=$((budget_s - elapsed))
  if ((left < 15)); then
    echo "out of time: ${elapsed}s of ${budget_s}s used before this step" >"$OUT/logs/$name.log"
    results+=("$name SKIP 0.0s (out of time)")
    failed=1
    echo "[$mode] $name: SKIP (out of time)"
    return
  fi
  ((limit > left)) && limit=$left
  echo "[$mode] $name (limit ${limit}s): $(printf '%q ' "$@")" | tee "$OUT/logs/$name.log"
  t0=$EPOCHREALTIME
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/logs/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  note="rc $rc"
  if ((rc == 0)); then
    status=PASS
  else
    status=FAIL
    failed=1
    if ((rc == 124 || rc == 137)); then
      note="rc $rc, timed out after ${limit}s"
      echo "timed out after ${limit}s" >>"$OUT/logs/$name.log"
    fi
  fi
  results+=("$name $status ${secs}s ($note)")
  echo "[$mode] $name: $status in ${secs}s ($note, log $OUT/logs/$name.log)"
}

dry_flag=()
[[ $mode == dry-run ]] && dry_flag=(--dry-run)

# 1. the machine
run_step device "${limits[0]}" "$py" benchmarks/gpu_check.py device --out "$OUT" "${dry_flag[@]}"
cp "$OUT/logs/device.log" "$OUT/device.txt"

# 2. the GPU tests (skip without CUDA)
run_step pytest_gpu "${limits[1]}" "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py

# 3. every rule on the device against the CPU
run_step compare "${limits[2]}" "$py" benchmarks/gpu_check.py compare --out "$OUT" --device "$device"

# 4. step times, side by side (bp first: ratios are to bp)
run_step "bench_conv2_b$conv2_small" "${limits[3]}" "$py" -m parallel_dkp bench "${conv2[@]}" \
  --set "data.batch_size=$conv2_small" --rules "$bench_rules" "${steps[@]}" --out "$OUT/bench_conv2_b$conv2_small.json"
run_step "bench_conv2_b$conv2_large" "${limits[4]}" "$py" -m parallel_dkp bench "${conv2[@]}" \
  --set "data.batch_size=$conv2_large" --rules "$bench_rules" "${steps[@]}" --out "$OUT/bench_conv2_b$conv2_large.json"
run_step "bench_alexnet_small_b$alex_batch" "${limits[5]}" "$py" -m parallel_dkp bench "${alex[@]}" \
  --rules "$bench_rules" "${steps[@]}" --out "$OUT/bench_alexnet_small_b$alex_batch.json"

# 5. the unlocking benchmark's one-device part and the cost model's calibration (per-block phases) on
#    the balanced networks: bp/dfa/dkp step times at M = 1 and 4, every block's forward, backward,
#    local update and optimizer step -> $OUT/unlocking_<model>.json (its "cost_model" section)
for model in convdeep vit; do
  run_step "unlocking_$model" "${limits[$([[ $model == convdeep ]] && echo 8 || echo 9)]}" "$py" -m parallel_dkp bench \
    --config configs/default.toml --set data.name=synthetic "${balanced_sizes[@]}" --set "model.name=$model" \
    --set run.progress=false --ranks 1 --microbatches 1,4 "${steps[@]}" --rounds 1 --out "$OUT/unlocking_$model.json"
done

# 6. peak memory of every rule
run_step "memory_conv2_b$conv2_large" "${limits[6]}" "$py" benchmarks/gpu_check.py memory --out "$OUT" \
  --device "$device" --name "conv2_b$conv2_large" "${conv2[@]}" --set "data.batch_size=$conv2_large" --steps "$mem_steps"
run_step "memory_alexnet_small_b$alex_batch" "${limits[7]}" "$py" benchmarks/gpu_check.py memory --out "$OUT" \
  --device "$device" --name "alexnet_small_b$alex_batch" "${alex[@]}" --steps "$mem_steps"

total=$(awk -v a="$start_all" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
card=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("device_name", "?"))' \
  "$OUT/device.json" 2>/dev/null || echo "?")
{
  echo "# benchmarks/gpu_check.sh, mode $mode, device $card, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
       "$(git status --porcelain 2>/dev/null | wc -l) uncommitted path(s); total ${total}s; logs in logs/"
  printf '%s\n' "${results[@]}"
  if ((failed)); then echo "# RESULT: FAIL"; else echo "# RESULT: PASS"; fi
} >"$summary"
cat "$summary"
exit "$failed"
