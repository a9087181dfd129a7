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

Environment:
  NPROC              number of ranks (default 2)
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

NPROC="${NPROC:-2}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS=1
if [[ -z "${GLOO_SOCKET_IFNAME:-}" ]]; then
    # One node: keep gloo on the loopback, whatever the host name resolves to.
    if [[ "$(uname -s)" == "Darwin" ]]; then GLOO_SOCKET_IFNAME=lo0; else GLOO_SOCKET_IFNAME=lo; fi
    export GLOO_SOCKET_IFNAME
fi

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--nnodes 1 --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT")
else
    rdzv=(--standalone)
fi

# torchrun == python -m torch.distributed.run; going through $PYTHON keeps the interpreter that
# has parallel_dkp installed. run.device/parallel.backend come first so the caller can override.
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" \
    -m parallel_dkp train --set run.device=cpu --set parallel.backend=gloo "$@"
