#!/usr/bin/env bash
# One node, one rank per GPU (NCCL), through torchrun. The ranks form stages x replicas: as many
# pipeline stages as the model's blocks allow, the rest data-parallel replicas (unless
# --set parallel.stages=... / parallel.replicas=... say otherwise); a layout that cannot work is
# refused by `python -m parallel_dkp plan --world-size N` before any rank starts.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/torchrun.sh [parallel-dkp train options...]

Runs `python -m parallel_dkp train` under torchrun on this node, one rank per GPU
(NCCL is picked automatically on CUDA). All arguments go to `train`;
`python -m parallel_dkp train --help` lists them.

The ranks form a grid of stages x replicas: every pipeline stage owns at least
one block of the model (conv2: 4 blocks, mlp: len(model.widths) + 1, alexnet and
alexnet_small: 8, vit and convdeep: model.depth + 2), and the ranks beyond the
stages become data-parallel replicas of the pipeline, each training on its own
shard of every batch. By default the stages are the largest divisor of the rank
count that is at most the block count (exactly len(parallel.partition) when that
is set); --set parallel.stages=S or --set parallel.replicas=R choose instead (they
go to train unchanged). Replicas of a stage are neighbouring ranks
(rank = stage * replicas + replica), so each stage's gradient all-reduce stays
among neighbouring GPUs. data.batch_size must be divisible by
replicas x parallel.microbatches.

Before starting anything the script asks
`python -m parallel_dkp plan --world-size N [train options]` for the layout; when
N ranks cannot run the config it exits with code 2 and the reason. Otherwise it
prints one line such as "launch/torchrun.sh: 8 ranks = 4 stages x 2 replicas"
on stderr and starts torchrun.

Environment:
  NPROC          number of ranks (default: the number of GPUs torch can see,
                 which honours CUDA_VISIBLE_DEVICES)
  RDZV_ENDPOINT  HOST:PORT of the rendezvous (default: torchrun --standalone,
                 a free port on localhost)
  PYTHON         interpreter that has parallel_dkp installed (default: python)
  MAX_RESTARTS   restart the ranks this many times after one dies (default 0); each
                 restart resumes from the newest checkpoint in run.out_dir

Example:
  launch/torchrun.sh --config configs/<experiment>.toml --set rule.name=dkp
  launch/torchrun.sh --config configs/cifar100_alexnet.toml --set parallel.stages=4
  NPROC=4 launch/torchrun.sh --set data.name=cifar10 --set parallel.microbatches=8

No GPU? launch/cpu_sim.sh runs the same job as CPU ranks with gloo.
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

PYTHON="${PYTHON:-python}"
me="launch/torchrun.sh"

if [[ -n "${NPROC:-}" ]]; then
    if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
        echo "$me: NPROC must be a positive number of ranks, got '$NPROC'" >&2
        exit 2
    fi
else
    gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    if [[ "$gpus" == "0" ]]; then
        echo "$me: torch sees no GPU here; set NPROC=N to launch N ranks anyway," \
             "or use launch/cpu_sim.sh for the CPU simulation" >&2
        exit 2
    fi
    NPROC="$gpus"
fi

# The stages x replicas layout of NPROC ranks, as train will resolve it (reads the config, loads
# no data). A layout that cannot work, or a config error, stops here with plan's message.
if ! layout="$("$PYTHON" -m parallel_dkp plan --world-size "$NPROC" "$@")"; then
    echo "$me: not started ($NPROC ranks: NPROC, default the GPUs torch sees; see the error above)" >&2
    exit 2
fi
read -r stages replicas _ <<<"$layout"
if ! [[ "$stages" =~ ^[1-9][0-9]*$ && "$replicas" =~ ^[1-9][0-9]*$ ]]; then
    echo "$me: 'python -m parallel_dkp plan --world-size $NPROC' answered '$layout', not 'STAGES REPLICAS'" >&2
    exit 2
fi
s_stage=s; s_replica=s
(( stages == 1 )) && s_stage=""
(( replicas == 1 )) && s_replica=""
echo "$me: $NPROC ranks = $stages stage$s_stage x $replicas replica$s_replica" >&2

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--nnodes 1 --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT")
else
    rdzv=(--standalone)
fi

# torchrun shares its rendezvous store with the ranks by default; after a restart
# (--max-restarts) the new ranks can then read the dead ranks' addresses and fail to connect
# (pytorch/pytorch#135712). A store of their own per attempt avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# torchrun == python -m torch.distributed.run, through $PYTHON to keep the right interpreter.
# MAX_RESTARTS: a rank that dies restarts the whole group this many times; each restart resumes
# from the newest complete checkpoint in run.out_dir.
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" \
    -m parallel_dkp train "$@"
