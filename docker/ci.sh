#!/usr/bin/env bash
# CI step (.ci/run calls it on every submission): build the CPU image from a clean checkout with
# docker/build.sh and smoke-run it (2 CPU ranks -> metrics.jsonl); then build the CUDA image
# (not run) when the disk has room; print the size and build time of each; give the disk back.
#
# Without a Docker engine it installs podman, buildah and debootstrap with apt (as root).
# Environment: CI_DOCKER_CUDA=0 skips the CUDA image, =1 insists on it;
# CI_DOCKER_MIN_FREE_GB (default 20) is the free space the CUDA build needs after the CPU one;
# CI_DOCKER_KEEP=1 keeps the images and the wheelhouse afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
me="docker/ci.sh"
t_start=$SECONDS

if command -v docker >/dev/null && timeout 30 docker info >/dev/null 2>&1; then
    engine=docker
else
    engine=podman
    missing=()
    for tool in podman buildah debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if (( ${#missing[@]} )); then
        echo "$me: installing ${missing[*]} with apt"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${missing[@]}" >/dev/null \
            || { apt-get update -q && apt-get install -y -q "${missing[@]}" >/dev/null; }
    fi
fi
echo "$me: engine $engine ($("$engine" --version))"

summary=()
report_line() {  # one line per image from docker/build.sh's report
    python3 - "docker/.cache/report-$1.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["seconds"]
print(f"{r['image']}: {r['size_bytes'] / 1e9:.2f} GB, build {t['build']} s (total {t['total']} s: wheelhouse "
      f"{t['wheelhouse']} s, base image {t['base_image']} s, smoke run {t['smoke_run']} s), torch {r['torch']} "
      f"from {r['torch_source']}" + (f", metrics {r['smoke_metrics']}" if r["smoke_metrics"] else ", not run"))
PY
}

# 1. The CPU image, built and smoke-run: must pass.
docker/build.sh cpu --engine "$engine"
summary+=("$(report_line cpu)")

# 2. The CUDA image, built only, when there is room (it shares the wheelhouse when the CPU image
#    fell back to PyPI's torch, but not the image layers: about 6 GB more).
graphroot="."
[[ "$engine" != podman ]] || graphroot="$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo .)"
free_gb="$(df -Pk . "$graphroot" | awk 'NR > 1 { print int($4 / 1048576) }' | sort -n | head -n 1)"
min_gb="${CI_DOCKER_MIN_FREE_GB:-20}"
cuda="${CI_DOCKER_CUDA:-auto}"
if [[ "$cuda" == 0 ]]; then
    summary+=("parallel-dkp:cuda: skipped (CI_DOCKER_CUDA=0)")
elif [[ "$cuda" == 1 ]] || (( free_gb >= min_gb )); then
    docker/build.sh cuda --engine "$engine" --no-smoke
    summary+=("$(report_line cuda)")
else
    summary+=("parallel-dkp:cuda: skipped, ${free_gb} GB free, it needs ${min_gb} GB (CI_DOCKER_CUDA=1 insists)")
fi

if [[ "${CI_DOCKER_KEEP:-0}" != 1 ]]; then
    # The two images (with their intermediate layers) and the wheelhouses: about 15 GB. The
    # debootstrap base (0.2 GB) stays for the next run on this machine.
    for flavour in cpu cuda; do
        image="parallel-dkp:$flavour"; [[ "$engine" != podman ]] || image="localhost/$image"
        "$engine" rmi "$image" >/dev/null 2>&1 || true
    done
    rm -rf docker/.cache/wheelhouse
fi

echo "$me: done in $((SECONDS - t_start)) s"
for line in "${summary[@]}"; do echo "$me: $line"; done
