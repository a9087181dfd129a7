#!/usr/bin/env bash
# CPU simulation of a layer-parallel run: NPROC ranks on this machine, gloo over loopback,
# one thread per rank (so N ranks on N cores do not fight over cores and timings mean something).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/cpu_sim.sh [parallel-dkp train options...]

Runs `python -m parallel_dkp train` under torchrun with NPROC ranks on the CPU
(gloo backend, loopback only, OMP_NUM_THREADS=1). All arguments go to `train`;
`python -m parallel_dkp train --help` lists them.

Every rank owns at least one block of the model, so NPROC may not exceed the
model's blocks (conv2: 4, mlp: len(model.widths) + 1, alexnet and alexnet_small: 8;
exactly len(parallel.partition) when that is set); the script checks with
`python -m parallel_dkp plan [train options]` and stops before starting any rank.

Environment:
  NPROC              number of ranks (default 2, or fewer if the model takes fewer)
  RDZV_ENDPOINT      HOST:PORT of the rendezvous, e.g. 127.0.0.1:29531
                     (default: torchrun --standalone, a free port on localhost)
  GLOO_SOCKET_IFNAME network interface gloo uses (default: the loopback, lo / lo0)
  PYTHON             interpreter that has parallel_dkp installed (default: python)

Example:
  launch/cpu_sim.sh --set data.name=synthetic --set run.max_steps=3 --set parallel.microbatches=4
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

PYTHON="${PYTHON:-python}"
me="launch/cpu_sim.sh"

# The most ranks these train arguments can use (reads the config, loads no data). A config
# error is reported here, with plan's exit code, before any rank starts.
max_ranks="$("$PYTHON" -m parallel_dkp plan --max-ranks "$@")" || exit $?
if ! [[ "$max_ranks" =~ ^[1-9][0-9]*$ ]]; then
    echo "$me: 'python -m parallel_dkp plan --max-ranks' answered '$max_ranks', not a rank count" >&2
    exit 2
fi
if [[ -z "${NPROC:-}" ]]; then
    NPROC=2
    if (( NPROC > max_ranks )); then
        echo "$me: this model takes at most $max_ranks ranks (every rank owns at least one block):" \
             "starting $max_ranks instead of the default 2" >&2
        NPROC="$max_ranks"
    fi
elif ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "$me: NPROC must be a positive number of ranks, got '$NPROC'" >&2
    exit 2
elif (( NPROC > max_ranks )); then
    echo "$me: NPROC=$NPROC, but this model takes at most $max_ranks ranks (every rank owns at least one" \
         "block; 'python -m parallel_dkp plan' with the same arguments lists them): set NPROC=$max_ranks" \
         "or fewer, or choose a deeper model" >&2
    exit 2
fi
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
