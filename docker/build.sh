#!/usr/bin/env bash
# Build the parallel_dkp images offline from a wheelhouse, with docker or podman, and smoke-run them.
# docs/launching.md ("Docker") has the walkthrough; `docker/build.sh --help` the options.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: docker/build.sh [cpu|cuda] [options]

Builds docker/Dockerfile.<flavour> (default: cpu) into the image parallel-dkp:<flavour>, then
smoke-runs its default command (2 CPU ranks, synthetic data, 2 steps) and checks the
metrics.jsonl it writes. Run it from anywhere; it works in the repository root.

  1. wheelhouse  pip download, on this host, of torch/torchvision and every other dependency
                 (pinned in its requirements.txt) into docker/.cache/wheelhouse/<source>/.
                 cpu: the PyTorch CPU index when it answers (source cpu-index), otherwise PyPI's
                 torch, a CUDA build that also runs on the CPU (source pypi; a message says so).
                 cuda: PyPI's torch (source pypi), which brings the CUDA libraries as wheels.
  2. base image  python:3.11-slim-bookworm when the engine has it or can pull it; otherwise a
                 Debian bookworm base made with debootstrap (needs root) and imported as
                 parallel-dkp-base:bookworm, with python3, python3-venv and Fashion-MNIST.
  3. build       docker build when a Docker engine answers, otherwise podman build
                 --isolation=chroot. pip in the build installs from the wheelhouse only
                 (--no-index): the build needs no network when the base has APT_PACKAGES.
  4. smoke run   docker run, or buildah run --isolation chroot (podman run when buildah is
                 missing), with runs/docker-<flavour>/<time>/ mounted on /app/runs.

Options:
  --engine docker|podman  container engine (default: docker if its engine answers, else podman)
  --tag NAME              image name (default: parallel-dkp:<flavour>)
  --base-image IMAGE      base image to build on (default: see step 2)
  --debootstrap           use the debootstrap base even when python:3.11-slim-bookworm is available
  --mirror URL            Debian mirror for debootstrap (default: http://deb.debian.org/debian)
  --apt-packages "LIST"   Debian packages the image installs unless the base has them
                          (default: dataset-fashion-mnist; "" for none)
  --torch-index URL       cpu: the PyTorch CPU wheel index, or a mirror of it
                          (default: https://download.pytorch.org/whl/cpu)
  --pypi                  cpu: take torch from PyPI without trying the CPU index
  --wheelhouse DIR        wheelhouse folder, under docker/ (default: docker/.cache/wheelhouse/<source>)
  --refresh               download the wheelhouse again even if it matches pyproject.toml
  --download-only         make the wheelhouse and the base image, then stop (step 1 and 2)
  --offline               download nothing: use the wheelhouse and base image already here, and
                          give the build a dead proxy so that any network use fails (air-gapped)
  --online                no wheelhouse: pip in the build installs from the internet
  --no-smoke              skip the smoke run
  --dry-run               print the decisions and commands, run nothing
  -h, --help              this text

Environment: PYTHON, the host interpreter that runs pip download (default: python3);
SMOKE_TIMEOUT_S, the smoke run's limit (default 600); PODMAN_ISOLATION (default chroot).
Caches: docker/.cache/ (wheelhouses, the build reports report-<flavour>.json; git ignores it);
images in the engine's own storage (podman: /var/lib/containers as root).
Air-gapped machine: `docker/build.sh cpu --download-only` where there is internet, carry the
repository (with docker/.cache/wheelhouse) and the base image (`podman save`/`docker save`) over,
then `docker/build.sh cpu --offline --base-image IMAGE` there.
USAGE
}

me="docker/build.sh"
die() { echo "$me: $*" >&2; exit 2; }
say() { echo "$me: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_REL="docker/.cache"
PY_TARGET="3.11"   # the base images' python3: python:3.11-slim-bookworm and Debian bookworm
DEFAULT_BASE="python:3.11-slim-bookworm"
LOCAL_BASE="parallel-dkp-base:bookworm"

flavour="cpu"
engine=""
tag=""
base_image=""
force_debootstrap=0
mirror="http://deb.debian.org/debian"
apt_packages="dataset-fashion-mnist"
apt_packages_set=0
torch_index="https://download.pytorch.org/whl/cpu"
force_pypi=0
wheelhouse=""
refresh=0
mode="wheelhouse"   # wheelhouse | download-only | offline | online
smoke=1
dry_run=0

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"; }
set_mode() {
    [[ "$mode" == "wheelhouse" || "$mode" == "$1" ]] || die "--$mode and --$1 exclude each other"
    mode="$1"
}

flavour_given=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        cpu|cuda)
            [[ $flavour_given == 0 ]] || die "one flavour at a time (got '$flavour' and '$1')"
            flavour="$1"; flavour_given=1 ;;
        --engine) need_value "$@"; engine="$2"; shift
            [[ "$engine" == docker || "$engine" == podman ]] || die "--engine must be docker or podman, got '$engine'" ;;
        --tag) need_value "$@"; tag="$2"; shift ;;
        --base-image) need_value "$@"; base_image="$2"; shift ;;
        --debootstrap) force_debootstrap=1 ;;
        --mirror) need_value "$@"; mirror="$2"; shift ;;
        --apt-packages) [[ $# -ge 2 ]] || die "--apt-packages needs a value (\"\" for none)"
            apt_packages="$2"; apt_packages_set=1; shift ;;
        --torch-index) need_value "$@"; torch_index="$2"; shift ;;
        --pypi) force_pypi=1 ;;
        --wheelhouse) need_value "$@"; wheelhouse="${2%/}"; shift ;;
        --refresh) refresh=1 ;;
        --download-only) set_mode download-only ;;
        --offline) set_mode offline ;;
        --online) set_mode online ;;
        --no-smoke) smoke=0 ;;
        --dry-run) dry_run=1 ;;
        *) die "unknown argument '$1' (flavours: cpu, cuda; options: --help)" ;;
    esac
    shift
done

[[ -n "$base_image" && $force_debootstrap == 1 ]] && die "--base-image and --debootstrap exclude each other"
[[ $force_pypi == 1 && "$flavour" == cuda ]] && die "--pypi is for the cpu flavour (cuda always takes PyPI's torch)"
[[ "$mode" == online && -n "$wheelhouse" ]] && die "--online builds without a wheelhouse; drop --wheelhouse"
if [[ -n "$wheelhouse" ]]; then
    # Relative to the repository root; only docker/ is mounted into the build.
    [[ "$wheelhouse" != /* ]] || wheelhouse="$(realpath -m --relative-to="$ROOT" "$wheelhouse")"
    [[ "$wheelhouse" == docker/* && "$wheelhouse" != *..* ]] \
        || die "--wheelhouse must be a folder under docker/ in the repository (the build mounts only docker/), got '$wheelhouse'"
fi
tag="${tag:-parallel-dkp:$flavour}"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

run() {  # print a command; run it unless --dry-run
    echo "+ $*" >&2
    [[ $dry_run == 1 ]] || "$@"
}

# ------------------------------------------------------------------ engine
engine_answers() { timeout 30 "$1" info >/dev/null 2>&1; }
if [[ -z "$engine" ]]; then
    if command -v docker >/dev/null && engine_answers docker; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    elif command -v docker >/dev/null; then
        die "docker is installed but its engine does not answer ('docker info' fails), and podman is missing:" \
            "start the Docker daemon, or install podman and buildah (apt-get install podman buildah)"
    else
        die "no container engine: install Docker, or podman and buildah (apt-get install podman buildah)"
    fi
else
    command -v "$engine" >/dev/null || die "--engine $engine: '$engine' is not installed"
fi
image_ref() {  # podman wants fully qualified names for what it pulls and imports
    if [[ "$engine" == podman && "$1" != */* ]]; then
        if [[ "$1" == "$LOCAL_BASE" || "$1" == parallel-dkp* ]]; then echo "localhost/$1"; else echo "docker.io/library/$1"; fi
    else
        echo "$1"
    fi
}
have_image() { "$engine" image inspect "$1" >/dev/null 2>&1; }
say "flavour $flavour, engine $engine, image $tag, mode $mode"

report_file="$CACHE_REL/report-$flavour.json"
if [[ $dry_run == 0 ]]; then
    mkdir -p "$CACHE_REL"
    # Git ignores the cache (the pytest way: a .gitignore that ignores everything, itself included).
    [[ -f "$CACHE_REL/.gitignore" ]] || echo '*' > "$CACHE_REL/.gitignore"
fi

t_start=$SECONDS

# ------------------------------------------------------------------ 1. wheelhouse
# pip download for the image's interpreter and platform, whatever this host runs.
arch="$(uname -m)"
target=(--only-binary=:all: --implementation cp --python-version "$PY_TARGET" --abi "cp${PY_TARGET/./}")
for minor in $(seq 36 -1 5); do target+=(--platform "manylinux_2_${minor}_${arch}"); done
target+=(--platform "manylinux2014_${arch}" --platform "manylinux2010_${arch}" --platform "manylinux1_${arch}")

cpu_index_answers() {
    "$PYTHON" - "$1" <<'PY'
import sys, urllib.request
url = sys.argv[1].rstrip("/") + "/torch/"
try:
    urllib.request.urlopen(url, timeout=15).read(1)
except Exception as err:  # DNS, TLS, refused, 404, timeout: all mean "not usable"
    print(f"{url}: {err}", file=sys.stderr)
    sys.exit(1)
PY
}

write_pins() {  # requirements.txt: name==version of every wheel except the build tools
    "$PYTHON" - "$1" <<'PY'
import pathlib, sys
wh = pathlib.Path(sys.argv[1])
pins = []
for whl in sorted(wh.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    if name.lower() not in ("setuptools", "wheel"):  # only for building parallel_dkp itself
        pins.append(f"{name}=={version}")
(wh / "requirements.txt").write_text("\n".join(pins) + "\n")
PY
}

wheelhouse_stamp() {  # what the wheelhouse was made for; a change means a new download
    { "$PYTHON" docker/torch_requirements.py --all; echo "source=$1 python=$PY_TARGET arch=$arch"
      [[ "$1" != cpu-index ]] || echo "index=$torch_index"; } \
        | sha256sum | cut -c1-16
}

torch_source=""
torch_pin=""
make_wheelhouse() {
    local source="$1" dir="$2" stamp new
    stamp="$(wheelhouse_stamp "$source")"
    if [[ $refresh == 0 && -f "$dir/requirements.txt" && "$(cat "$dir/STAMP" 2>/dev/null)" == "$stamp" ]]; then
        say "wheelhouse $dir is up to date ($(wc -l < "$dir/requirements.txt") pinned packages; --refresh downloads it again)"
        return 0
    fi
    new="$dir.partial"
    run rm -rf "$new"
    run mkdir -p "$new"
    [[ $dry_run == 1 ]] || "$PYTHON" docker/torch_requirements.py --all > "$CACHE_REL/dependencies.txt"
    local pins=()
    if [[ "$source" == cpu-index ]]; then
        [[ $dry_run == 1 ]] || "$PYTHON" docker/torch_requirements.py > "$CACHE_REL/torch-requirements.txt"
        # From the CPU index only: pip's configuration (an extra index, find-links) could offer a
        # higher CUDA build. Checked below: both must be CPU builds (+cpu).
        run env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
            "$PYTHON" -m pip download -q --progress-bar off --no-deps \
            --index-url "$torch_index" --timeout 60 "${target[@]}" -d "$new" -r "$CACHE_REL/torch-requirements.txt" \
            || return 1
        local whl name f
        if [[ $dry_run == 0 ]]; then
            : > "$CACHE_REL/torch-pins.txt"
            for name in torch torchvision; do
                whl=""
                for f in "$new/$name"-[0-9]*.whl; do [[ -f "$f" ]] && whl="$(basename "$f")"; done
                [[ "$whl" == *+cpu-* ]] || { say "no CPU wheel of $name from $torch_index (got '${whl:-nothing}')"; return 1; }
                echo "$whl" | sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/' >> "$CACHE_REL/torch-pins.txt"
            done
        fi
        # Pinned, so that the resolution below keeps these CPU builds.
        pins=(--find-links "$new" -c "$CACHE_REL/torch-pins.txt")
    fi
    run "$PYTHON" -m pip download -q --progress-bar off "${target[@]}" -d "$new" "${pins[@]}" -r "$CACHE_REL/dependencies.txt" \
        "setuptools>=64" wheel || return 1
    [[ $dry_run == 1 ]] && return 0
    write_pins "$new"
    echo "$stamp" > "$new/STAMP"
    echo "$source" > "$new/SOURCE"
    rm -rf "$dir"
    mv "$new" "$dir"
    say "wheelhouse $dir: $(wc -l < "$dir/requirements.txt") pinned packages, $(du -sh "$dir" | cut -f1)"
}

wheelhouse_for() { echo "${wheelhouse:-$CACHE_REL/wheelhouse/$1}"; }

t0=$SECONDS
if [[ "$mode" == online ]]; then
    torch_source="online (inside the build)"
elif [[ "$mode" == offline ]]; then
    if [[ -z "$wheelhouse" ]]; then
        wheelhouse="$(wheelhouse_for pypi)"
        [[ "$flavour" == cpu && $force_pypi == 0 && -f "$(wheelhouse_for cpu-index)/requirements.txt" ]] \
            && wheelhouse="$(wheelhouse_for cpu-index)"
    fi
    [[ -f "$wheelhouse/requirements.txt" ]] \
        || die "--offline: no wheelhouse at $wheelhouse (requirements.txt missing); make it with" \
               "'docker/build.sh $flavour --download-only' on a machine with internet and copy it here"
    torch_source="$(cat "$wheelhouse/SOURCE" 2>/dev/null || echo unknown) (wheelhouse $wheelhouse)"
else
    source=pypi
    if [[ "$flavour" == cpu && $force_pypi == 0 ]]; then
        say "cpu: trying the PyTorch CPU index $torch_index for CPU wheels of torch and torchvision"
        if [[ $dry_run == 1 ]] || cpu_index_answers "$torch_index"; then
            if make_wheelhouse cpu-index "$(wheelhouse_for cpu-index)"; then
                source=cpu-index
            else
                say "the CPU index $torch_index answered, but the download of CPU wheels failed (above)"
            fi
        else
            say "the CPU index $torch_index cannot be reached from this host"
        fi
        if [[ "$source" == pypi ]]; then
            run rm -rf "$(wheelhouse_for cpu-index).partial"
            say "FALLING BACK TO PYPI: the cpu image gets PyPI's torch, a CUDA build (about 4.5 GB larger" \
                "with its nvidia-* wheels; it runs on the CPU all the same). For CPU wheels, give" \
                "--torch-index URL (a mirror of the CPU index) on a host that reaches it."
        fi
    fi
    if [[ "$source" == pypi ]]; then
        make_wheelhouse pypi "$(wheelhouse_for pypi)" || die "pip download from the package index failed (above)"
    fi
    wheelhouse="$(wheelhouse_for "$source")"
    case "$source" in
        cpu-index) torch_source="CPU wheels from $torch_index" ;;
        pypi) torch_source="PyPI (CUDA build)" ;;
    esac
fi
t_wheelhouse=$((SECONDS - t0))
if [[ -n "$wheelhouse" && $dry_run == 0 ]]; then
    torch_pin="$(grep -E '^torch==' "$wheelhouse/requirements.txt" || true)"
    say "torch: ${torch_pin:-?} from $torch_source"
fi

# ------------------------------------------------------------------ 2. base image
make_debootstrap_base() {
    local ref rootfs
    ref="$(image_ref "$LOCAL_BASE")"
    if have_image "$ref" && [[ $refresh == 0 ]]; then
        say "base image $ref is there (made with debootstrap earlier; --refresh makes it again)"
        return 0
    fi
    command -v debootstrap >/dev/null || die "no base image: $DEFAULT_BASE cannot be pulled and debootstrap is" \
        "missing (apt-get install debootstrap), or give --base-image IMAGE"
    [[ $(id -u) == 0 || $dry_run == 1 ]] || die "debootstrap needs root; run as root, or give --base-image IMAGE"
    rootfs="$CACHE_REL/base-rootfs"
    local include="python3,python3-venv,ca-certificates"
    [[ -n "$apt_packages" ]] && include="$include,${apt_packages// /,}"
    run rm -rf "$rootfs"
    say "debootstrap: Debian bookworm (minbase + $include) from $mirror"
    run mkdir -p "$rootfs"
    echo "+ debootstrap --variant=minbase --include=$include bookworm $rootfs $mirror > $CACHE_REL/debootstrap.log" >&2
    if [[ $dry_run == 0 ]]; then
        debootstrap --variant=minbase --include="$include" bookworm "$rootfs" "$mirror" > "$CACHE_REL/debootstrap.log" 2>&1 \
            || { tail -n 20 "$CACHE_REL/debootstrap.log" >&2; die "debootstrap failed: $CACHE_REL/debootstrap.log"; }
    fi
    run rm -rf "$rootfs/var/cache/apt/archives" "$rootfs/var/lib/apt/lists"
    run mkdir -p "$rootfs/var/cache/apt/archives/partial" "$rootfs/var/lib/apt/lists/partial"
    echo "+ tar -C $rootfs -c . | $engine import ... - $ref" >&2
    if [[ $dry_run == 0 ]]; then
        tar -C "$rootfs" -c . | "$engine" import \
            --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
            --change "ENV LANG=C.UTF-8" --change 'CMD ["bash"]' - "$ref" >/dev/null
    fi
    run rm -rf "$rootfs"
}

t0=$SECONDS
if [[ -n "$base_image" ]]; then
    base_ref="$(image_ref "$base_image")"
    if [[ "$mode" == offline && $dry_run == 0 ]] && ! have_image "$base_ref"; then
        die "--offline: the base image $base_ref is not in $engine's storage: '$engine load -i FILE' it first"
    fi
elif [[ $force_debootstrap == 1 ]]; then
    make_debootstrap_base
    base_ref="$(image_ref "$LOCAL_BASE")"
else
    default_ref="$(image_ref "$DEFAULT_BASE")"
    local_ref="$(image_ref "$LOCAL_BASE")"
    if [[ $dry_run == 1 ]]; then
        base_ref="$default_ref"
        say "would use $default_ref if $engine has it or can pull it, else the debootstrap base $local_ref"
    elif have_image "$default_ref"; then
        base_ref="$default_ref"
    elif [[ "$mode" != offline ]] && timeout 600 "$engine" pull "$default_ref" >/dev/null 2>&1; then
        base_ref="$default_ref"
    elif have_image "$local_ref"; then
        base_ref="$local_ref"
        say "$default_ref is not available; using the debootstrap base $local_ref made earlier"
    elif [[ "$mode" == offline ]]; then
        die "--offline: neither $default_ref nor $local_ref is in $engine's storage; load one" \
            "('$engine load -i FILE') or give --base-image IMAGE"
    else
        say "$default_ref cannot be pulled here: making a Debian bookworm base with debootstrap"
        make_debootstrap_base
        base_ref="$local_ref"
    fi
fi
t_base=$((SECONDS - t0))
say "base image: $base_ref"

if [[ "$mode" == download-only ]]; then
    say "--download-only: wheelhouse $wheelhouse and base image $base_ref are ready" \
        "($((SECONDS - t_start)) s); build later with: docker/build.sh $flavour --offline --base-image $base_ref"
    exit 0
fi

# ------------------------------------------------------------------ 3. build
build_args=(--build-arg "BASE_IMAGE=$base_ref")
if [[ "$mode" != online ]]; then
    build_args+=(--build-arg "WHEELHOUSE=$wheelhouse")
    [[ $dry_run == 1 ]] || build_args+=(--build-arg "WHEELHOUSE_ID=$(sha256sum < "$wheelhouse/requirements.txt" | cut -c1-16)")
fi
[[ $apt_packages_set == 1 ]] && build_args+=(--build-arg "APT_PACKAGES=$apt_packages")
if [[ "$mode" == offline ]]; then
    # Nothing may reach the network: pip uses --no-index anyway; apt (if the base lacks
    # APT_PACKAGES) or anything else fails at once on this dead proxy.
    dead="http://127.0.0.1:9"
    build_args+=(--build-arg "http_proxy=$dead" --build-arg "https_proxy=$dead"
                 --build-arg "HTTP_PROXY=$dead" --build-arg "HTTPS_PROXY=$dead" --build-arg "no_proxy=" --build-arg "NO_PROXY=")
fi
image="$(image_ref "$tag")"
if [[ "$engine" == podman ]]; then
    # chroot isolation: RUN steps work where the default runtime cannot make cgroups
    # (containers, CI machines); chroot isolation allows no network other than the host's.
    build_cmd=(podman build --isolation="${PODMAN_ISOLATION:-chroot}" --network=host)
else
    build_cmd=(docker build)
fi
old_id=""
[[ $dry_run == 1 ]] || old_id="$("$engine" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
t0=$SECONDS
run "${build_cmd[@]}" -f "docker/Dockerfile.$flavour" -t "$image" "${build_args[@]}" . \
    || die "the $engine build of $image failed (above)"
t_build=$((SECONDS - t0))
if [[ -n "$old_id" && $dry_run == 0 ]]; then
    # The image this tag named before, now nameless: remove it (only it), gigabytes otherwise.
    new_id="$("$engine" image inspect --format '{{.Id}}' "$image")"
    if [[ "$old_id" != "$new_id" && -z "$("$engine" image inspect --format '{{join .RepoTags ","}}' "$old_id" 2>/dev/null)" ]]; then
        if "$engine" rmi "$old_id" >/dev/null 2>&1; then say "removed the previous $image ($old_id)"; fi
    fi
fi
size_bytes=0
if [[ $dry_run == 0 ]]; then
    size_bytes="$("$engine" image inspect --format '{{.Size}}' "$image")"
fi
size_gb="$(awk -v b="$size_bytes" 'BEGIN { printf "%.2f", b / 1e9 }')"
say "built $image in ${t_build} s: ${size_gb} GB"

# ------------------------------------------------------------------ 4. smoke run
metrics=""
smoke_timeout="${SMOKE_TIMEOUT_S:-600}"
t0=$SECONDS
if [[ $smoke == 1 ]]; then
    out="runs/docker-$flavour/$(date -u +%Y%m%d-%H%M%S)"
    run mkdir -p "$out"
    if [[ "$engine" == docker ]]; then
        run timeout -k 30 "$smoke_timeout" docker run --rm -v "$ROOT/$out:/app/runs" "$image" || die "the smoke run of $image failed (above)"
    elif command -v buildah >/dev/null; then
        # The image's default command (CMD), run the way the build ran its RUN steps.
        mapfile -t cmd < <(if [[ $dry_run == 1 ]]; then echo "<CMD of $image>"; else
            podman image inspect --format '{{json .Config.Cmd}}' "$image" \
                | "$PYTHON" -c 'import json, sys; print("\n".join(json.load(sys.stdin)))'; fi)
        ctr=""
        cleanup() { [[ -z "$ctr" ]] || buildah rm "$ctr" >/dev/null 2>&1 || true; }
        trap cleanup EXIT
        if [[ $dry_run == 1 ]]; then echo "+ buildah from $image" >&2; else ctr="$(buildah from "$image")"; fi
        # --hostname localhost: torchrun's rendezvous store uses the host name, and buildah's
        # /etc/hosts does not list the container's own.
        run timeout -k 30 "$smoke_timeout" buildah run --isolation "${PODMAN_ISOLATION:-chroot}" --hostname localhost \
            -v "$ROOT/$out:/app/runs" "${ctr:-CTR}" -- "${cmd[@]}" \
            || die "the smoke run of $image failed (above)"
        cleanup; ctr=""
    else
        run timeout -k 30 "$smoke_timeout" podman run --rm -v "$ROOT/$out:/app/runs" "$image" || die "the smoke run of $image failed (above)"
    fi
    metrics="$out/smoke/metrics.jsonl"
    if [[ $dry_run == 0 ]]; then
        "$PYTHON" - "$metrics" <<'PY' || die "the smoke run did not write the metrics it should: $metrics"
import json, pathlib, sys
path = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
if not rows or any(r.get("world_size") != 2 for r in rows):
    sys.exit(f"{path}: expected lines from a 2-rank run, got {rows}")
print(f"docker/build.sh: smoke run: {path}: {len(rows)} line(s), world_size=2, train_loss={rows[-1].get('train_loss')}",
      file=sys.stderr)
PY
    fi
fi
t_smoke=$((SECONDS - t0))
t_total=$((SECONDS - t_start))

[[ $dry_run == 1 ]] && exit 0
wheelhouse_bytes=0
[[ -z "$wheelhouse" ]] || wheelhouse_bytes="$(du -sb "$wheelhouse" | cut -f1)"
R_FLAVOUR="$flavour" R_ENGINE="$engine" R_IMAGE="$image" R_SIZE="$size_bytes" R_BASE="$base_ref" \
R_SOURCE="$torch_source" R_TORCH="${torch_pin#torch==}" R_WHEELHOUSE="$wheelhouse" R_WHEELHOUSE_BYTES="$wheelhouse_bytes" \
R_METRICS="$metrics" R_TIMES="$t_wheelhouse $t_base $t_build $t_smoke $t_total" \
"$PYTHON" - "$report_file" <<'PY'
import json, os, sys
e = os.environ
times = dict(zip(["wheelhouse", "base_image", "build", "smoke_run", "total"], map(int, e["R_TIMES"].split())))
report = {
    "flavour": e["R_FLAVOUR"], "engine": e["R_ENGINE"], "image": e["R_IMAGE"], "size_bytes": int(e["R_SIZE"]),
    "base_image": e["R_BASE"], "torch": e["R_TORCH"], "torch_source": e["R_SOURCE"],
    "wheelhouse": e["R_WHEELHOUSE"] or None, "wheelhouse_bytes": int(e["R_WHEELHOUSE_BYTES"]),
    "smoke_metrics": e["R_METRICS"] or None, "seconds": times,
}
with open(sys.argv[1], "w") as f:
    f.write(json.dumps(report, indent=2) + "\n")
PY
smoke_note=""
[[ -z "$metrics" ]] || smoke_note="; smoke run metrics in $metrics"
say "done in ${t_total} s (wheelhouse ${t_wheelhouse} s, base image ${t_base} s, build ${t_build} s," \
    "smoke run ${t_smoke} s): $image, ${size_gb} GB, torch ${torch_pin#torch==} from ${torch_source}${smoke_note};" \
    "report in $report_file"
