#!/usr/bin/env bash
# CPU simulation of a layer-parallel run: NPROC ranks on this machine, gloo over loopback,
# one thread per rank (so N ranks on N cores do not fight over cores and timings mean something).
# The ranks form stages x replicas, as on GPUs; `python -m parallel_dkp plan --world-size NPROC`
# checks the layout before any rank starts.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/cpu_sim.sh [parallel-dkp train options...]

Runs `python -m parallel_dkp train` under torchrun with NPROC ranks on the CPU
(gloo backend, loopback only, OMP_NUM_THREADS=1). All arguments go to `train`;
`python -m parallel_dkp train --help` lists them.

The ranks form a grid of stages x replicas: every pipeline stage owns at least
one block of the model (conv2: 4 blocks, mlp: len(model.widths) + 1, alexnet and
alexnet_small: 8, vit and convdeep: model.depth + 2), and the ranks beyond the
stages become data-parallel replicas. By default the stages are the largest
divisor of NPROC that is at most the block count (exactly len(parallel.partition)
when that is set); --set parallel.stages=S or --set parallel.replicas=R choose
instead. Replicas of a stage are neighbouring ranks
(rank = stage * replicas + replica). data.batch_size must be divisible by
replicas x parallel.microbatches. The script asks
`python -m parallel_dkp plan --world-size NPROC [train options]` first: a layout
that cannot work exits with code 2 and the reason before any rank starts;
otherwise one line such as "launch/cpu_sim.sh: 2 ranks = 2 stages x 1 replica"
goes to stderr.

Environment:
  NPROC              number of ranks (default 2)
  RDZV_ENDPOINT      HOST:PORT of the rendezvous, e.g. 127.0.0.1:29531
                     (default: torchrun --standalone, a free port on localhost)
  GLOO_SOCKET_IFNAME network interface gloo uses (default: the loopback, lo / lo0)
  PYTHON             interpreter that has parallel_dkp installed (default: python)

Example:
  launch/cpu_sim.sh --set data.name=synthetic --set run.max_steps=3 --set parallel.microbatches=4
  NPROC=8 launch/cpu_sim.sh --set data.name=synthetic --set parallel.stages=2
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

PYTHON="${PYTHON:-python}"
me="launch/cpu_sim.sh"

NPROC="${NPROC:-2}"
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "$me: NPROC must be a positive number of ranks, got '$NPROC'" >&2
    exit 2
fi
# The stages x replicas layout of NPROC ranks, as train will resolve it (reads the config, loads
# no data). A layout that cannot work, or a config error, stops here with plan's message.
if ! layout="$("$PYTHON" -m parallel_dkp plan --world-size "$NPROC" "$@")"; then
    echo "$me: not started ($NPROC ranks: NPROC, default 2; see the error above)" >&2
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

export OMP_NUM_THREADS=1
if [[ -z "${GLOO_SOCKET_IFNAME:-}" ]]; then
    # One node: keep gloo on the loopback, whatever the host name resolves to.
    if [[ "$(uname -s)" == "Darwin" ]]; then GLOO_SOCKET_IFNAME=lo0; else GLOO_SOCKET_IFNAME=lo; fi
    export GLOO_SOCKET_IFNAME
fi

# torchrun shares its rendezvous store with the ranks by default; after a restart
# (--max-restarts) the new ranks can then read the dead ranks' addresses and fail to connect
# (pytorch/pytorch#135712). A store of their own per attempt avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--nnodes 1 --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT")
else
    rdzv=(--standalone)
fi

# torchrun == python -m torch.distributed.run; going through $PYTHON keeps the interpreter that
# has parallel_dkp installed. run.device/parallel.backend come first so the caller can override.
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" \
    -m parallel_dkp train --set run.device=cpu --set parallel.backend=gloo "$@"
