#!/bin/sh
# Runs inside the image builds (Dockerfile.cpu, Dockerfile.cuda), from /app:
#
#   sh /context/docker/install.sh deps      torch, torchvision and every other dependency
#   sh /context/docker/install.sh project   the package itself (pip install .)
#
# The build bind-mounts the repository's docker/ folder at /context/docker (CONTEXT_DIR=/context).
# Build arguments arrive as environment variables:
#   WHEELHOUSE       a folder of the build context under docker/ (docker/build.sh makes one in
#                    docker/.cache/wheelhouse/): install from it with --no-index, no network
#                    used; empty: install from the package indexes (needs internet)
#   TORCH_INDEX_URL  where torch/torchvision come from when WHEELHOUSE is empty
#                    (Dockerfile.cpu: the PyTorch CPU index; Dockerfile.cuda: PyPI)
set -eu

me="docker/install.sh"
stage="${1:-}"
wheelhouse="${WHEELHOUSE:-}"

if [ -n "$wheelhouse" ]; then
    case "$wheelhouse" in
        docker/*) ;;
        *) echo "$me: WHEELHOUSE=$wheelhouse must be a folder under docker/ in the build context" \
                "(only docker/ is mounted into the build), e.g. docker/.cache/wheelhouse/pypi" >&2
           exit 2 ;;
    esac
    dir="${CONTEXT_DIR:-/context}/$wheelhouse"
    if [ ! -f "$dir/requirements.txt" ]; then
        echo "$me: $wheelhouse/requirements.txt is missing in the build context: make the wheelhouse" \
             "with docker/build.sh (or docker/build.sh --download-only), or build without" \
             "--build-arg WHEELHOUSE to install from the internet" >&2
        exit 2
    fi
fi

case "$stage" in
deps)
    if [ -n "$wheelhouse" ]; then
        echo "$me: installing the dependencies from the wheelhouse $wheelhouse (--no-index, offline)"
        pip install --no-index --find-links "$dir" -r "$dir/requirements.txt"
    else
        echo "$me: installing torch/torchvision from $TORCH_INDEX_URL"
        reqs="$(mktemp)"
        python "${CONTEXT_DIR:-/context}/docker/torch_requirements.py" > "$reqs"
        pip install --index-url "$TORCH_INDEX_URL" -r "$reqs"
        rm "$reqs"
    fi
    ;;
project)
    if [ -n "$wheelhouse" ]; then
        # The dependencies are in (pip check below proves it); setuptools, the build backend,
        # comes from the wheelhouse too.
        pip install --no-index --find-links "$dir" --no-deps .
    else
        pip install .
    fi
    rm -rf build parallel_dkp.egg-info
    pip check
    python -c "import torch, torchvision, parallel_dkp as p; print('$me: torch', torch.__version__, \
'(CUDA', str(torch.version.cuda) + '), torchvision', torchvision.__version__, '- parallel_dkp', p.__version__)"
    ;;
*)
    echo "usage: $me deps|project" >&2
    exit 2
    ;;
esac
