#!/usr/bin/env bash
# Step-time measurements for docs/results.md, each ratio measured side by side in one run.
# Usage: benchmarks/cpu_timing.sh [OUT_DIR]  (default docs/bench). Needs an otherwise idle machine.
set -euo pipefail
out=${1:-docs/bench}
mkdir -p "$out"
common=(--config configs/default.toml --set data.train_limit=2048 --set data.test_limit=128 --set run.progress=false)
port=${PORT:-29541}

# 1. algorithmic: one device, all rules side by side, bp first (ratio = rule / bp); all threads.
parallel-dkp bench "${common[@]}" --rules bp,dfa,dkp,drtp,fa,kp,bp_fc_only --steps 30 --warmup 5 \
  --out "$out/single_conv2_b128.json"

# 2. the same at one thread (the per-rank budget of the 2-rank runs below).
OMP_NUM_THREADS=1 parallel-dkp bench "${common[@]}" --set parallel.microbatches=4 --rules bp,dkp,dfa,drtp \
  --steps 20 --warmup 3 --out "$out/single_conv2_b128_m4_1thread.json"

# 3. layer-parallel on 2 ranks (gloo, one thread each): dkp/dfa/drtp vs bp through
#    torch.distributed.pipelining, same partition and M; GPipe, then 1F1B.
for schedule in gpipe 1f1b; do
  OMP_NUM_THREADS=1 torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" \
    -m parallel_dkp bench "${common[@]}" --set parallel.microbatches=4 --set parallel.schedule=$schedule \
    --rules bp,dkp,dfa,drtp --steps 20 --warmup 3 --out "$out/2ranks_conv2_b128_m4_$schedule.json"
done

# 4. a model whose blocks cost about the same (conv2's second conv block is most of its work,
#    which caps what 2 ranks can gain): mlp 784-1024-1024-1024-10, partition [2, 2].
mlp=(--set model.name=mlp --set "model.widths=[1024, 1024, 1024]" --set parallel.microbatches=4)
OMP_NUM_THREADS=1 parallel-dkp bench "${common[@]}" "${mlp[@]}" --rules bp,dkp,dfa,drtp --steps 20 --warmup 3 \
  --out "$out/single_mlp1024_b128_m4_1thread.json"
OMP_NUM_THREADS=1 torchrun --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" \
  -m parallel_dkp bench "${common[@]}" "${mlp[@]}" --set "parallel.partition=[2, 2]" --rules bp,dkp,dfa,drtp \
  --steps 20 --warmup 3 --out "$out/2ranks_mlp1024_b128_m4_gpipe.json"
