#!/usr/bin/env bash
# One node, one rank per GPU (NCCL), through torchrun; never more ranks than the model has blocks.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/torchrun.sh [parallel-dkp train options...]

Runs `python -m parallel_dkp train` under torchrun on this node, one rank per GPU
(NCCL is picked automatically on CUDA). All arguments go to `train`;
`python -m parallel_dkp train --help` lists them.

Every rank owns at least one block of the model, so a run takes at most as many
ranks as the model has blocks (conv2: 4, mlp: len(model.widths) + 1, alexnet and
alexnet_small: 8; exactly len(parallel.partition) when that is set).
`python -m parallel_dkp plan [train options]` prints the block list and that number;
this script asks it before starting anything.

Environment:
  NPROC          number of ranks (default: the number of GPUs torch can see,
                 which honours CUDA_VISIBLE_DEVICES, capped at the model's
                 blocks; the GPUs beyond that stay idle). An NPROC above the
                 model's blocks stops the script before torchrun starts.
  RDZV_ENDPOINT  HOST:PORT of the rendezvous (default: torchrun --standalone,
                 a free port on localhost)
  PYTHON         interpreter that has parallel_dkp installed (default: python)
  MAX_RESTARTS   restart the ranks this many times after one dies (default 0); each
                 restart resumes from the newest checkpoint in run.out_dir

Example:
  launch/torchrun.sh --config configs/<experiment>.toml --set rule.name=dkp
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

# The most ranks these train arguments can use (reads the config, loads no data). A config
# error is reported here, with plan's exit code, before any rank starts.
max_ranks="$("$PYTHON" -m parallel_dkp plan --max-ranks "$@")" || exit $?
if ! [[ "$max_ranks" =~ ^[1-9][0-9]*$ ]]; then
    echo "$me: 'python -m parallel_dkp plan --max-ranks' answered '$max_ranks', not a rank count" >&2
    exit 2
fi

if [[ -n "${NPROC:-}" ]]; then
    if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
        echo "$me: NPROC must be a positive number of ranks, got '$NPROC'" >&2
        exit 2
    fi
    if (( NPROC > max_ranks )); then
        echo "$me: NPROC=$NPROC, but this model takes at most $max_ranks ranks (every rank owns" \
             "at least one block; 'python -m parallel_dkp plan' with the same arguments lists them):" \
             "set NPROC=$max_ranks or fewer, or unset NPROC to start min(visible GPUs, $max_ranks) ranks" >&2
        exit 2
    fi
else
    gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    if [[ "$gpus" == "0" ]]; then
        echo "$me: torch sees no GPU here; set NPROC=N to launch N ranks anyway," \
             "or use launch/cpu_sim.sh for the CPU simulation" >&2
        exit 2
    fi
    if (( gpus > max_ranks )); then
        echo "$me: $gpus GPUs visible, but this model takes at most $max_ranks ranks (every rank owns at least" \
             "one block): starting $max_ranks ranks; the other GPUs stay idle" >&2
        NPROC="$max_ranks"
    else
        NPROC="$gpus"
    fi
fi

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
