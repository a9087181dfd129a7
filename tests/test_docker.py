"""docker/: the Dockerfiles' build arguments, the in-build installer (docker/install.sh) and the
build script (docker/build.sh), checked without a container engine: stand-ins for pip, docker,
podman and buildah record what the scripts would run. All of it takes a few seconds.

The real proof is CI: .ci/run runs docker/ci.sh, which builds the CPU image with docker/build.sh
(podman when there is no Docker engine), smoke-runs it to a metrics.jsonl and builds the CUDA
image; no test here needs podman.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_launch import DOCKERFILES, dockerfile_instructions, dockerignore_patterns, dockerignored

REPO = Path(__file__).resolve().parents[1]
BUILD_SH = "docker/build.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What docker/build.sh and install.sh call, for a PATH that holds them and nothing else (no
# docker, podman or buildah unless a test adds a stand-in).
TOOLS = ["bash", "sh", "env", "timeout", "uname", "seq", "realpath", "dirname", "sha256sum", "cut", "cat",
         "awk", "date", "mkdir", "rm", "grep", "sed", "ls", "wc", "du", "id", "tail", "head", "mv", "tar",
         "sort", "mktemp", "basename", "tr", "cp"]


def _run(cmd, *, env=None, cwd=REPO, timeout=60) -> subprocess.CompletedProcess:
    """``cmd`` (its program found on this PATH) with ``env`` over this environment."""
    cmd = [shutil.which(cmd[0]) or cmd[0], *cmd[1:]]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHON": sys.executable, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False)


def tail(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def bare_path(tmp_path: Path, **stubs: str) -> str:
    """A PATH with the basic tools (symlinks) and the given stand-ins, nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        found = shutil.which(tool)
        if found and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    for name, body in stubs.items():
        _stub(bin_dir / name, body)
    return str(bin_dir)


ENGINE_OK = 'echo "$(basename "$0") $*" >> "$STUB_LOG"; exit 0\n'
ENGINE_DOWN = 'if [[ "$1" == info ]]; then echo "Cannot connect to the Docker daemon" >&2; exit 1; fi\nexit 0\n'


def build_sh(args, tmp_path: Path, **stubs: str) -> subprocess.CompletedProcess:
    env = {"PATH": bare_path(tmp_path, **stubs), "STUB_LOG": str(tmp_path / "stub.log")}
    return _run(["bash", BUILD_SH, *args], env=env)


def commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    """The commands build.sh printed (`+ ...` lines on stderr), split into words."""
    return [shlex.split(line[2:]) for line in proc.stderr.splitlines() if line.startswith("+ ")]


def find(cmds: list[list[str]], *prefix: str) -> list[str]:
    hits = [c for c in cmds if c[: len(prefix)] == list(prefix)]
    assert hits, f"no command starting with {prefix} in {cmds}"
    return hits[0]


def build_args(cmd: list[str]) -> dict[str, str]:
    return dict(cmd[i + 1].split("=", 1) for i, w in enumerate(cmd) if w == "--build-arg")


# --------------------------------------------------------------------------- Dockerfiles


def args_of(path: Path) -> dict[str, str]:
    """``ARG NAME=default`` of a Dockerfile, in order."""
    out = {}
    for keyword, args in dockerfile_instructions(path):
        if keyword == "ARG":
            name, _, default = args.partition("=")
            out[name] = default
    return out


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_takes_base_image_wheelhouse_and_torch_index_as_build_arguments(flavour):
    """Pinpoints a Dockerfile that hard-codes its base image or its package source: BASE_IMAGE must
    be declared before FROM and used by it (default: the public python:3.11-slim-bookworm, no
    NVIDIA base), WHEELHOUSE must default to empty (online), TORCH_INDEX_URL to the flavour's index."""
    path = DOCKERFILES[flavour]
    instructions = dockerfile_instructions(path)
    first_from = next(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    before = dict(a.partition("=")[::2] for k, a in instructions[:first_from] if k == "ARG")
    assert before == {"BASE_IMAGE": "python:3.11-slim-bookworm"}, before
    assert [a for k, a in instructions if k == "FROM"] == ["${BASE_IMAGE}"]
    declared = args_of(path)
    assert declared["WHEELHOUSE"] == "" and "WHEELHOUSE_ID" in declared
    assert declared["APT_PACKAGES"] == "dataset-fashion-mnist"
    expected_index = {"cpu": CPU_INDEX, "cuda": "https://pypi.org/simple"}[flavour]
    assert declared["TORCH_INDEX_URL"] == expected_index


def test_the_two_dockerfiles_differ_only_in_the_torch_index():
    """Pinpoints an edit to one Dockerfile that was not made to the other: apart from comments
    and TORCH_INDEX_URL's default they must be the same instructions."""
    def normalised(path):
        return [(k, "ARG TORCH_INDEX_URL=<flavour>" if a.startswith("TORCH_INDEX_URL=") else a)
                for k, a in dockerfile_instructions(path)]

    assert normalised(DOCKERFILES["cpu"]) == normalised(DOCKERFILES["cuda"])


def test_pip_steps_mount_the_docker_folder_that_dockerignore_keeps():
    """Pinpoints a pip step that does not get docker/ (install.sh, the wheelhouse) mounted, a
    .dockerignore that drops the wheelhouse or lets the debootstrap root file system into the
    context, or the dependency layer coming after the code (every code change would reinstall torch)."""
    instructions = dockerfile_instructions(DOCKERFILES["cpu"])
    runs = [a for k, a in instructions if k == "RUN" and a.startswith("--mount")]
    assert [r.split()[-1] for r in runs] == ["deps", "project"], runs
    for r in runs:
        mount = dict(kv.split("=", 1) for kv in r.split()[0].removeprefix("--mount=").split(","))
        assert mount == {"type": "bind", "source": "docker", "target": "/context/docker"}, r
        assert r.split()[1:3] == ["sh", "/context/docker/install.sh"], r
    order = [a for k, a in instructions if k in ("COPY", "RUN")]
    assert order.index("parallel_dkp parallel_dkp") > order.index(runs[0])

    patterns = dockerignore_patterns()
    for kept in ["docker/install.sh", "docker/torch_requirements.py",
                 "docker/.cache/wheelhouse/pypi/requirements.txt", "docker/.cache/wheelhouse/cpu-index/x.whl"]:
        assert not dockerignored(kept, patterns), f".dockerignore drops {kept}"
    for dropped in ["docker/.cache/base-rootfs/etc/passwd", "docker/.cache/report-cpu.json", "runs/docker-cpu/x"]:
        assert dockerignored(dropped, patterns), f".dockerignore keeps {dropped} in the build context"


# --------------------------------------------------------------------------- docker/install.sh


@pytest.fixture
def installer(tmp_path):
    """docker/install.sh run here as in the build: CONTEXT_DIR holds docker/ (its helper and a
    wheelhouse), pip and python are stand-ins that record their arguments."""
    ctx = tmp_path / "context"
    (ctx / "docker" / "wh").mkdir(parents=True)
    shutil.copy(REPO / "docker" / "torch_requirements.py", ctx / "docker")
    (ctx / "docker" / "wh" / "requirements.txt").write_text("torch==2.14.1\n")
    work = tmp_path / "app"
    work.mkdir()
    shutil.copy(REPO / "pyproject.toml", work)
    log = tmp_path / "calls.log"
    path = bare_path(tmp_path,
                     pip='echo "pip $*" >> "$CALLS"\n',
                     python=f'if [[ "$1" == -c ]]; then echo "python -c" >> "$CALLS"; '
                            f'else exec {shlex.quote(sys.executable)} "$@"; fi\n')

    def call(stage, **env):
        proc = _run(["sh", str(REPO / "docker" / "install.sh"), stage], cwd=work,
                    env={"PATH": path, "CALLS": str(log), "CONTEXT_DIR": str(ctx),
                         "TORCH_INDEX_URL": CPU_INDEX, "WHEELHOUSE": "", **env})
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, calls

    return call, ctx


def test_install_sh_installs_from_the_wheelhouse_with_no_index(installer):
    """Pinpoints the offline build reaching for an index: with WHEELHOUSE set, both pip steps must
    use --no-index --find-links on the mounted wheelhouse (deps from its requirements.txt, the
    package with --no-deps), then pip check."""
    call, ctx = installer
    wh = f"{ctx}/docker/wh"
    deps, calls = call("deps", WHEELHOUSE="docker/wh")
    assert deps.returncode == 0, tail(deps)
    assert calls == [f"pip install --no-index --find-links {wh} -r {wh}/requirements.txt"]

    project, calls = call("project", WHEELHOUSE="docker/wh")
    assert project.returncode == 0, tail(project)
    assert calls == [f"pip install --no-index --find-links {wh} --no-deps .", "pip check", "python -c"]


def test_install_sh_online_takes_torch_from_the_torch_index(installer, tmp_path):
    """Pinpoints the online build (no WHEELHOUSE) not installing exactly pyproject's torch and
    torchvision ranges from TORCH_INDEX_URL before the package."""
    call, _ = installer
    seen = tmp_path / "reqs.txt"
    # A pip that also keeps the requirements file it was given.
    _stub(tmp_path / "bin" / "pip", f'echo "pip $*" >> "$CALLS"; cp "${{@: -1}}" {shlex.quote(str(seen))}\n')
    deps, calls = call("deps")
    assert deps.returncode == 0, tail(deps)
    assert len(calls) == 1 and calls[0].startswith(f"pip install --index-url {CPU_INDEX} -r "), calls
    assert [line.split(">")[0].split("<")[0] for line in seen.read_text().splitlines()] == ["torch", "torchvision"]


@pytest.mark.parametrize("wheelhouse, stage, message", [
    ("/abs/wh", "deps", "must be a folder under docker/"),
    ("docker/missing", "deps", "requirements.txt is missing"),
    ("", "everything", "usage: docker/install.sh deps|project"),
])
def test_install_sh_refuses_bad_wheelhouse_and_stage(installer, wheelhouse, stage, message):
    """Pinpoints install.sh going on (to the network) with a wheelhouse the build cannot see, or
    with an unknown stage: exit 2 with the reason, no pip call."""
    call, _ = installer
    proc, calls = call(stage, WHEELHOUSE=wheelhouse)
    assert proc.returncode == 2 and message in proc.stderr, tail(proc)
    assert calls == []


# --------------------------------------------------------------------------- docker/build.sh


def test_build_sh_help(tmp_path):
    """Pinpoints docker/build.sh starting a build on --help instead of explaining itself."""
    proc = build_sh(["--help"], tmp_path, podman=ENGINE_OK)
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.startswith("Usage: docker/build.sh [cpu|cuda]")
    for option in ["--offline", "--download-only", "--online", "--base-image", "--wheelhouse", "--torch-index",
                   "--engine", "--no-smoke", "--dry-run"]:
        assert option in proc.stdout, option


@pytest.mark.parametrize("args, message", [
    (["gpu"], "unknown argument 'gpu'"),
    (["cpu", "cuda"], "one flavour at a time"),
    (["--engine", "lxc"], "--engine must be docker or podman"),
    (["--tag"], "--tag needs a value"),
    (["--wheelhouse", "/tmp/wh"], "--wheelhouse must be a folder under docker/"),
    (["--online", "--wheelhouse", "docker/wh"], "--online builds without a wheelhouse"),
    (["--offline", "--online"], "exclude each other"),
    (["cuda", "--pypi"], "--pypi is for the cpu flavour"),
    (["--base-image", "debian:12", "--debootstrap"], "exclude each other"),
])
def test_build_sh_rejects_bad_arguments(tmp_path, args, message):
    """Pinpoints an argument mistake that docker/build.sh lets through to a build: exit 2, the
    reason on stderr, no engine called."""
    proc = build_sh([*args, "--dry-run"], tmp_path, podman=ENGINE_OK)
    assert proc.returncode == 2 and message in proc.stderr, tail(proc)
    assert not (tmp_path / "stub.log").exists()


def test_build_sh_without_an_engine_says_what_to_install(tmp_path):
    """Pinpoints docker/build.sh failing obscurely without a container engine, or taking a docker
    client whose engine does not answer (this machine's case) instead of podman."""
    none = build_sh(["--dry-run"], tmp_path)
    assert none.returncode == 2 and "no container engine" in none.stderr and "podman" in none.stderr, tail(none)

    client_only = build_sh(["--dry-run"], tmp_path, docker=ENGINE_DOWN)
    assert client_only.returncode == 2 and "does not answer" in client_only.stderr, tail(client_only)

    podman = build_sh(["--dry-run", "--refresh"], tmp_path, docker=ENGINE_DOWN, podman=ENGINE_OK, buildah=ENGINE_OK)
    assert podman.returncode == 0, tail(podman)
    assert "engine podman" in podman.stderr


def test_build_sh_podman_plan_downloads_cpu_wheels_then_builds_offline_and_smoke_runs(tmp_path):
    """Pinpoints the podman path losing a step: the CPU index tried for torch/torchvision (for
    the image's Python 3.11, binary wheels only), the rest downloaded into the same wheelhouse,
    podman build --isolation=chroot from docker/Dockerfile.cpu with BASE_IMAGE and WHEELHOUSE,
    and the smoke run through buildah with the run folder mounted on /app/runs."""
    proc = build_sh(["cpu", "--dry-run", "--refresh"], tmp_path, podman=ENGINE_OK, buildah=ENGINE_OK)
    assert proc.returncode == 0, tail(proc)
    cmds = commands(proc)
    downloads = [c for c in cmds if sys.executable in c
                 and c[c.index(sys.executable) + 1:][:3] == ["-m", "pip", "download"]]
    assert len(downloads) == 2, cmds
    torch_dl, rest_dl = downloads
    assert torch_dl[torch_dl.index("--index-url") + 1] == CPU_INDEX and "--no-deps" in torch_dl
    assert "PIP_CONFIG_FILE=/dev/null" in torch_dl, "pip's own configuration could add CUDA builds of torch"
    assert rest_dl[0] == sys.executable
    for dl in downloads:
        assert "--only-binary=:all:" in dl and dl[dl.index("--python-version") + 1] == "3.11"
        assert dl[dl.index("-d") + 1] == "docker/.cache/wheelhouse/cpu-index.partial"
    assert "--index-url" not in rest_dl and "setuptools>=64" in rest_dl

    build = find(cmds, "podman", "build")
    assert build[2:4] == ["--isolation=chroot", "--network=host"] and build[-1] == "."
    assert build[build.index("-f") + 1] == "docker/Dockerfile.cpu"
    assert build[build.index("-t") + 1] == "localhost/parallel-dkp:cpu"
    assert build_args(build) == {"BASE_IMAGE": "docker.io/library/python:3.11-slim-bookworm",
                                 "WHEELHOUSE": "docker/.cache/wheelhouse/cpu-index"}

    smoke = find(cmds, "timeout", "-k", "30", "600", "buildah", "run")
    assert smoke[6:10] == ["--isolation", "chroot", "--hostname", "localhost"], smoke
    mount = smoke[smoke.index("-v") + 1]
    assert re.fullmatch(rf"{re.escape(str(REPO))}/runs/docker-cpu/\d{{8}}-\d{{6}}:/app/runs", mount), mount
    assert not (tmp_path / "stub.log").exists(), "--dry-run called the engine for more than `info`"


def test_build_sh_docker_plan_and_the_other_modes(tmp_path):
    """Pinpoints the docker path (docker build / docker run of the default command), --pypi (no
    CPU index), --online (no wheelhouse, no download) and --no-smoke not doing what they say."""
    docker = build_sh(["cuda", "--dry-run", "--refresh"], tmp_path, docker=ENGINE_OK)
    assert docker.returncode == 0, tail(docker)
    cmds = commands(docker)
    assert [c for c in cmds if "--index-url" in c] == [], "cuda must take torch from PyPI"
    build = find(cmds, "docker", "build")
    assert build[build.index("-f") + 1] == "docker/Dockerfile.cuda"
    assert build[build.index("-t") + 1] == "parallel-dkp:cuda"
    assert build_args(build)["WHEELHOUSE"] == "docker/.cache/wheelhouse/pypi"
    run = find(cmds, "timeout", "-k", "30", "600", "docker", "run")
    assert run[6] == "--rm" and run[-1] == "parallel-dkp:cuda", run

    pypi = build_sh(["cpu", "--pypi", "--no-smoke", "--dry-run", "--refresh"], tmp_path, docker=ENGINE_OK)
    assert pypi.returncode == 0, tail(pypi)
    assert "--index-url" not in " ".join(" ".join(c) for c in commands(pypi))
    assert build_args(find(commands(pypi), "docker", "build"))["WHEELHOUSE"] == "docker/.cache/wheelhouse/pypi"
    assert not [c for c in commands(pypi) if "run" in c[:6]], "--no-smoke still ran the image"

    online = build_sh(["cpu", "--online", "--dry-run", "--base-image", "debian:bookworm"], tmp_path, docker=ENGINE_OK)
    assert online.returncode == 0, tail(online)
    assert not [c for c in commands(online) if "download" in c]
    assert build_args(find(commands(online), "docker", "build")) == {"BASE_IMAGE": "debian:bookworm"}


def test_build_sh_offline_needs_a_wheelhouse(tmp_path):
    """Pinpoints --offline starting a build (that would then need the network) without a
    wheelhouse, instead of saying how to make one."""
    proc = build_sh(["cpu", "--offline", "--wheelhouse", "docker/.cache/no-such-wheelhouse", "--dry-run"], tmp_path,
                    podman=ENGINE_OK)
    assert proc.returncode == 2, tail(proc)
    assert "no wheelhouse" in proc.stderr and "--download-only" in proc.stderr, tail(proc)


# --------------------------------------------------------------------------- CI


def test_ci_builds_the_images_on_every_run():
    """Pinpoints the image build dropping out of CI: .ci/run must end with docker/ci.sh, which
    builds and smoke-runs the CPU image and builds the CUDA image; all scripts must parse."""
    ci = (REPO / ".ci" / "run").read_text()
    lines = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[-1].endswith("bash docker/ci.sh"), lines[-1]
    step = (REPO / "docker" / "ci.sh").read_text()
    assert re.search(r"^docker/build\.sh cpu --engine \"\$engine\"$", step, re.MULTILINE)
    assert re.search(r"^\s+docker/build\.sh cuda --engine \"\$engine\" --no-smoke$", step, re.MULTILINE)
    for script in [".ci/run", "docker/ci.sh", "docker/build.sh"]:
        proc = _run(["bash", "-n", script])
        assert proc.returncode == 0, tail(proc)
    proc = _run(["sh", "-n", "docker/install.sh"])
    assert proc.returncode == 0, tail(proc)
