"""The launchers (launch/), the Docker images (docker/) and the accelerate configs, run for real
where this CPU machine allows: every spawned command has a timeout and uses 127.0.0.1 only.

Two real 2-rank training runs (the Docker default command, which is the CPU simulation, and
accelerate) take ~15-20 s each on 2 cores, almost all of it importing torch in every process;
two accelerate launches of a shell take ~5 s each; the rest is instant.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_dkp.config import load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.cuda"}
SHELL_SCRIPTS = sorted(p.relative_to(REPO).as_posix() for pattern in ("*.sh", "*.sbatch") for p in LAUNCH.glob(pattern))
ACCELERATE = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
SMALL = ["--set", "data.name=synthetic", "--set", "data.synthetic_shape=[1, 8, 8]", "--set", "data.synthetic_size=128",
         "--set", "data.batch_size=16", "--set", "run.progress=false"]
RUN_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, *, timeout=RUN_TIMEOUT_S, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root with the test's interpreter as $PYTHON."""
    full_env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, check=False, capture_output=True, text=True, timeout=timeout)


def metrics_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def tail(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return instructions


def copy_pairs(path: Path) -> list[tuple[list[str], str, str]]:
    """``(sources, destination, workdir)`` of every COPY from the build context."""
    pairs, workdir = [], "/"
    for keyword, args in dockerfile_instructions(path):
        if keyword == "WORKDIR":
            workdir = args
        if keyword != "COPY":
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue  # from another stage, not from the repository
        paths = [w for w in words if not w.startswith("--")]
        pairs.append((paths[:-1], paths[-1], workdir))
    return pairs


def default_cmd(path: Path) -> list[str]:
    cmds = [args for keyword, args in dockerfile_instructions(path) if keyword == "CMD"]
    assert len(cmds) == 1, f"{path}: expected one CMD, found {len(cmds)}"
    assert cmds[0].startswith("["), f"{path}: CMD should be in exec (JSON) form, got {cmds[0]!r}"
    return json.loads(cmds[0])


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """``(is_exception, regex)`` per .dockerignore line, with Docker's ``*``/``**``/``?`` meaning."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def dockerignored(rel_path: str, patterns) -> bool:
    """True when Docker leaves ``rel_path`` out of the build context (it or a parent matches)."""
    parts = rel_path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_copies_existing_paths_that_dockerignore_keeps(flavour):
    """Pinpoints a Dockerfile COPY of a path that is missing, or that .dockerignore drops from the
    build context (the build would fail with "not found"), or a COPY that does not mirror the
    repository layout under WORKDIR (the documented commands would not find their files)."""
    path, patterns = DOCKERFILES[flavour], dockerignore_patterns()
    pairs = copy_pairs(path)
    assert pairs, f"{path} copies nothing"
    copied = set()
    for sources, dest, workdir in pairs:
        assert workdir == "/app", f"{path}: COPY into WORKDIR {workdir!r}, expected /app"
        assert len(sources) == 1 and dest.rstrip("/") == sources[0].rstrip("/"), (
            f"{path}: COPY {sources} {dest} does not keep the repository path")
        src = sources[0].rstrip("/")
        assert (REPO / src).exists(), f"{path}: COPY source {src!r} does not exist in the repository"
        files = [REPO / src] if (REPO / src).is_file() else [
            f for f in (REPO / src).rglob("*")
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
        assert files, f"{path}: COPY source {src!r} is an empty directory"
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not dockerignored(rel, patterns), f".dockerignore excludes {rel}, which {path.name} copies"
        copied.add(src)
    assert {"pyproject.toml", "parallel_dkp", "launch"} <= copied


def test_dockerfiles_default_to_the_same_small_cpu_simulation():
    """Pinpoints a default CMD that is not the CPU simulation, differs between the two images, or
    passes a --set the config rejects (unknown key or bad value)."""
    cmds = {flavour: default_cmd(path) for flavour, path in DOCKERFILES.items()}
    assert cmds["cpu"] == cmds["cuda"]
    cmd = cmds["cpu"]
    assert cmd[:2] == ["bash", "launch/cpu_sim.sh"], cmd
    overrides = [cmd[i + 1] for i, word in enumerate(cmd) if word == "--set"]
    cfg = load_config(None, overrides)
    assert cfg.data.name == "synthetic" and 0 < cfg.run.max_steps <= 3


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The Docker default command, run here in the repository root (same layout as /app in the
    images), for 2 epochs. It is `bash launch/cpu_sim.sh` with small settings, so this one 2-rank
    run serves both the Docker test and the CPU-simulation test (each costs ~15 s on 2 cores)."""
    cmd = default_cmd(DOCKERFILES["cpu"])
    tmp = tmp_path_factory.mktemp("smoke")
    out = tmp / "out"
    proc = run([*cmd, "--set", "run.epochs=2", "--set", f"run.out_dir={out}"],
               env={"RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"})
    return proc, tmp, out


@pytest.mark.multirank
def test_docker_default_cmd_runs_here(smoke_run):
    """Pinpoints a Docker default command that fails: what `docker run parallel-dkp:cpu` (or :cuda)
    runs in /app, run here in the repository root, which has the same layout."""
    proc, _, out = smoke_run
    assert proc.returncode == 0, tail(proc)
    assert (out / "metrics.jsonl").is_file() and (out / "config.toml").is_file()


@pytest.mark.multirank
def test_cpu_sim_runs_two_ranks_and_writes_metrics_once(smoke_run):
    """Pinpoints launch/cpu_sim.sh failing to run a 2-rank gloo job for 2 steps here, or more than
    one rank reporting: metrics.jsonl must hold exactly one line per epoch, written by one rank.
    (The run is the Docker default command, which is cpu_sim.sh; see the smoke_run fixture.)"""
    proc, tmp, out = smoke_run
    assert proc.returncode == 0, tail(proc)
    assert "world_size=2" in proc.stderr and "device=cpu" in proc.stderr, tail(proc)
    rows = metrics_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2], rows
    batch_size = load_config(None, [w for w in default_cmd(DOCKERFILES["cpu"]) if "=" in w]).data.batch_size
    assert all(r["world_size"] == 2 and r["train_examples"] == 2 * batch_size for r in rows), rows
    assert proc.stderr.count("epoch 1: train loss") == 1, tail(proc)
    assert [p.relative_to(tmp) for p in tmp.rglob("metrics.jsonl")] == [Path("out/metrics.jsonl")]


def test_torch_requirements_helper_reads_pyproject():
    """Pinpoints docker/torch_requirements.py no longer finding torch/torchvision in pyproject.toml
    (an online CPU build would install no CPU wheel), or --all not listing every runtime
    dependency (docker/build.sh's wheelhouse, and so the offline build, would miss one)."""
    declared = run([sys.executable, "docker/torch_requirements.py"], timeout=60)
    assert declared.returncode == 0, tail(declared)
    names = [re.match(r"[A-Za-z0-9_.-]+", line).group(0) for line in declared.stdout.splitlines()]
    assert names == ["torch", "torchvision"], declared.stdout
    assert all(re.search(r"[<>=]", line) for line in declared.stdout.splitlines())

    everything = run([sys.executable, "docker/torch_requirements.py", "--all"], timeout=60)
    assert everything.returncode == 0, tail(everything)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert everything.stdout.splitlines() == expected, everything.stdout


# --------------------------------------------------------------------------- shell launchers


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_is_valid_bash(script):
    """Pinpoints a syntax error in a launcher (bash -n parses without running)."""
    assert {"launch/cpu_sim.sh", "launch/torchrun.sh", "launch/slurm.sbatch"} <= set(SHELL_SCRIPTS)
    proc = run(["bash", "-n", script], timeout=30)
    assert proc.returncode == 0, tail(proc)


@pytest.mark.parametrize("script", ["launch/cpu_sim.sh", "launch/torchrun.sh"])
def test_launcher_prints_usage_on_h(script):
    """Pinpoints a launcher that starts a job on -h instead of explaining itself."""
    proc = run(["bash", script, "-h"], timeout=30, env={"PYTHON": "/nonexistent/python"})
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.startswith(f"Usage: {script}"), proc.stdout
    assert "NPROC" in proc.stdout


def _stub(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def _fake_python(tmp_path: Path) -> Path:
    """A stand-in for $PYTHON: answers the GPU count probe with $FAKE_GPUS, runs the real
    `python -m parallel_dkp plan` (so the rank limit is the real model's), and echoes any other
    command (the torchrun line) instead of running it."""
    return _stub(tmp_path / "python", 'if [[ "$1" == "-c" ]]; then echo "$FAKE_GPUS"\n'
                                      'elif [[ "$1 $2 ${3:-}" == "-m parallel_dkp plan" ]]; then\n'
                                      '    exec "$REAL_PYTHON" "$@"\n'
                                      'else echo "$@"; fi\n')


def _launch(script: str, args, fake: Path, **env) -> subprocess.CompletedProcess:
    return run(["bash", script, *args], timeout=60, env={"PYTHON": str(fake), "REAL_PYTHON": sys.executable, **env})


def _layout_notes(proc: subprocess.CompletedProcess, script: str) -> list[str]:
    """The launcher's own lines on stderr (``launch/x.sh: ...``)."""
    return [line for line in proc.stderr.splitlines() if line.startswith(f"{script}:")]


def test_torchrun_sh_uses_one_rank_per_visible_gpu(tmp_path):
    """Pinpoints launch/torchrun.sh miscounting ranks (default: GPUs torch sees; NPROC overrides),
    dropping the train arguments, not printing the layout, or starting a job on a machine
    without GPUs."""
    fake = _fake_python(tmp_path)
    args = ["--set", "rule.name=dkp"]  # conv2, 4 blocks

    four = _launch("launch/torchrun.sh", args, fake, FAKE_GPUS="4")
    assert four.returncode == 0, tail(four)
    assert four.stdout.split() == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                                   "--max-restarts", "0", "-m", "parallel_dkp", "train", *args], four.stdout
    assert _layout_notes(four, "launch/torchrun.sh") == ["launch/torchrun.sh: 4 ranks = 4 stages x 1 replica"], \
        tail(four)

    pinned = _launch("launch/torchrun.sh", [], fake, FAKE_GPUS="4", NPROC="3", RDZV_ENDPOINT="127.0.0.1:29999")
    assert "--nproc-per-node 3" in pinned.stdout and "--rdzv-endpoint 127.0.0.1:29999" in pinned.stdout, tail(pinned)
    assert "3 ranks = 3 stages x 1 replica" in pinned.stderr, tail(pinned)

    none = _launch("launch/torchrun.sh", [], fake, FAKE_GPUS="0")
    assert none.returncode == 2 and "no GPU" in none.stderr and "cpu_sim.sh" in none.stderr, tail(none)
    assert "torch.distributed.run" not in none.stdout

    bad = _launch("launch/torchrun.sh", [], fake, FAKE_GPUS="4", NPROC="two")
    assert bad.returncode == 2 and "NPROC must be a positive number" in bad.stderr, tail(bad)
    assert "torch.distributed.run" not in bad.stdout


def test_torchrun_sh_puts_ranks_beyond_the_blocks_into_replicas(tmp_path):
    """Pinpoints launch/torchrun.sh capping the ranks at the model's blocks (8 GPUs, conv2 with 4
    blocks must start all 8 ranks as 4 stages x 2 replicas and say so on stderr), miscounting a
    model with enough blocks (alexnet, 8 blocks: 8 stages x 1 replica), or not passing a
    --set parallel.stages override through to train unchanged."""
    fake = _fake_python(tmp_path)
    conv2 = _launch("launch/torchrun.sh", ["--config", "configs/cifar10_conv2.toml"], fake, FAKE_GPUS="8")
    assert conv2.returncode == 0, tail(conv2)
    assert conv2.stdout.split()[3:5] == ["--nproc-per-node", "8"], conv2.stdout
    assert conv2.stdout.split()[-2:] == ["--config", "configs/cifar10_conv2.toml"], conv2.stdout
    assert _layout_notes(conv2, "launch/torchrun.sh") == ["launch/torchrun.sh: 8 ranks = 4 stages x 2 replicas"], \
        tail(conv2)

    alexnet = _launch("launch/torchrun.sh", ["--config", "configs/tiny_imagenet_alexnet.toml"], fake, FAKE_GPUS="8")
    assert alexnet.returncode == 0, tail(alexnet)
    assert alexnet.stdout.split()[3:5] == ["--nproc-per-node", "8"], tail(alexnet)
    assert "8 ranks = 8 stages x 1 replica" in alexnet.stderr, tail(alexnet)

    args = ["--config", "configs/cifar100_alexnet.toml", "--set", "parallel.stages=2"]
    two = _launch("launch/torchrun.sh", args, fake, FAKE_GPUS="8")
    assert two.returncode == 0, tail(two)
    assert two.stdout.split()[-4:] == args and "8 ranks = 2 stages x 4 replicas" in two.stderr, tail(two)

    six = _launch("launch/torchrun.sh", ["--set", "model.name=conv2"], fake, FAKE_GPUS="8", NPROC="6")
    assert six.returncode == 0 and "--nproc-per-node 6" in six.stdout, tail(six)
    assert "6 ranks = 3 stages x 2 replicas" in six.stderr, tail(six)  # the largest divisor of 6 <= 4 blocks


def test_torchrun_sh_refuses_a_layout_that_cannot_work_before_launching(tmp_path):
    """Pinpoints launch/torchrun.sh letting a bad layout (more stages than blocks, a batch the
    replicas x micro-batches do not divide) or a config typo reach torchrun: it must exit 2 before
    torchrun starts, with the library's own message."""
    fake = _fake_python(tmp_path)
    stages = _launch("launch/torchrun.sh", ["--set", "model.name=conv2", "--set", "parallel.stages=8"], fake,
                     FAKE_GPUS="8")
    assert stages.returncode == 2, tail(stages)
    assert "torch.distributed.run" not in stages.stdout, tail(stages)
    err = " ".join(stages.stderr.split())
    assert "8 pipeline stages but the model has only 4 blocks" in err and "parallel.replicas" in err, tail(stages)
    assert "launch/torchrun.sh: not started (8 ranks" in err, tail(stages)

    # conv2 on 8 ranks: 4 stages x 2 replicas; 2 x 4 micro-batches = 8 does not divide 100
    batch = _launch("launch/torchrun.sh", ["--set", "data.batch_size=100", "--set", "parallel.microbatches=4"], fake,
                    FAKE_GPUS="8")
    assert batch.returncode == 2 and "torch.distributed.run" not in batch.stdout, tail(batch)
    err = " ".join(batch.stderr.split())
    assert "data.batch_size (100) must be divisible by parallel.replicas (2) x parallel.microbatches (4) = 8" in err, \
        tail(batch)
    # ... while 4 GPUs (4 stages x 1 replica) run the same arguments
    assert _launch("launch/torchrun.sh", ["--set", "data.batch_size=100", "--set", "parallel.microbatches=4"], fake,
                   FAKE_GPUS="4").returncode == 0

    typo = _launch("launch/torchrun.sh", ["--set", "model.nmae=conv2"], fake, FAKE_GPUS="8")
    assert typo.returncode == 2 and "torch.distributed.run" not in typo.stdout, tail(typo)
    assert "config error" in typo.stderr and "model.name" in typo.stderr, tail(typo)


def test_cpu_sim_sh_checks_the_layout_before_launching(tmp_path):
    """Pinpoints launch/cpu_sim.sh starting ranks for a layout that cannot work (NPROC=5 on conv2
    is 1 stage x 5 replicas, whose shard of the 128 batch is not whole: exit 2 before torchrun
    with the library's message), capping NPROC at the blocks (NPROC=8 on conv2: 4 stages x 2
    replicas), or changing the default 2 ranks for a 1-entry parallel.partition (1 stage x 2
    replicas)."""
    fake = _fake_python(tmp_path)
    five = _launch("launch/cpu_sim.sh", [], fake, NPROC="5")
    assert five.returncode == 2 and "torch.distributed.run" not in five.stdout, tail(five)
    err = " ".join(five.stderr.split())
    assert "data.batch_size (128) must be divisible by parallel.replicas (5)" in err, tail(five)
    assert "launch/cpu_sim.sh: not started (5 ranks" in err, tail(five)

    eight = _launch("launch/cpu_sim.sh", [], fake, NPROC="8")
    assert eight.returncode == 0 and "--nproc-per-node 8 " in eight.stdout, tail(eight)
    assert _layout_notes(eight, "launch/cpu_sim.sh") == ["launch/cpu_sim.sh: 8 ranks = 4 stages x 2 replicas"]

    one = _launch("launch/cpu_sim.sh", ["--set", "parallel.partition=[4]"], fake)
    assert one.returncode == 0, tail(one)
    assert "--nproc-per-node 2 " in one.stdout and "2 ranks = 1 stage x 2 replicas" in one.stderr, tail(one)
    assert one.stdout.rstrip().endswith("--set parallel.backend=gloo --set parallel.partition=[4]"), one.stdout


def _slurm_env(bin_dir: Path, nodes: int, gpus: int) -> dict[str, str]:
    """Stand-ins for scontrol (lists gpu-node-07, -08, ...) and srun (echoes its command line)."""
    bin_dir.mkdir(exist_ok=True)
    hosts = "\\n".join(f"gpu-node-{7 + i:02d}" for i in range(nodes))
    _stub(bin_dir / "scontrol", f'printf "{hosts}\\n"\n')
    _stub(bin_dir / "srun", 'echo "srun $*"\n')
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
            "SLURM_NNODES": str(nodes), "SLURM_GPUS_ON_NODE": str(gpus), "SLURM_JOB_ID": "4242"}


def _sbatch_default(text: str, option: str) -> int:
    match = re.search(rf"^#SBATCH --{option}=(\d+)$", text, re.MULTILINE)
    assert match, f"no #SBATCH --{option}=N line"
    return int(match.group(1))


def test_slurm_script_runs_one_c10d_torchrun_per_node(tmp_path):
    """Pinpoints launch/slurm.sbatch losing its `srun torchrun ... --rdzv-backend c10d` line, the
    head node (first of `scontrol show hostnames`), the node/GPU counts or the train arguments
    (2 nodes x 4 GPUs of alexnet, 8 blocks)."""
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert re.search(r"^srun torchrun --nnodes \"\$SLURM_NNODES\" --nproc-per-node \"\$GPUS_PER_NODE\" "
                     r"--max-restarts \"\$\{MAX_RESTARTS:-1\}\" \\\n"
                     r"\s+--rdzv-backend c10d --rdzv-endpoint \"\$HEAD_NODE:\$RDZV_PORT\" --rdzv-id \"\$SLURM_JOB_ID\"",
                     text, re.MULTILINE), "the srun torchrun c10d line changed"
    sbatch_lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert any("--nodes=" in line for line in sbatch_lines)
    assert any("--ntasks-per-node=1" in line for line in sbatch_lines)

    # Run the script with stand-ins for the Slurm commands: it must build the right command line.
    args = ["--config", "configs/cifar100_alexnet.toml", "--set", "rule.name=dkp"]
    proc = run(["bash", "launch/slurm.sbatch", *args], timeout=60, env=_slurm_env(tmp_path / "bin", 2, 4))
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.split() == [
        "srun", "torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--max-restarts", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu-node-07:29500", "--rdzv-id", "4242", "-m", "parallel_dkp", "train", *args], proc.stdout
    assert "launch/slurm.sbatch: 8 ranks = 8 stages x 1 replica" in proc.stderr.splitlines(), tail(proc)


def test_slurm_script_lays_out_two_nodes_of_eight_gpus(tmp_path):
    """Pinpoints launch/slurm.sbatch capping a job at the model's blocks or printing the wrong
    layout: 2 nodes x 8 GPUs of alexnet (8 blocks) run as 8 stages x 2 replicas, or 4 x 4 with
    --set parallel.stages=4 (passed to train unchanged); conv2 (4 blocks) runs as 4 x 4."""
    env = _slurm_env(tmp_path / "bin", 2, 8)
    cases = [
        (["--config", "configs/cifar100_alexnet.toml"], "16 ranks = 8 stages x 2 replicas"),
        (["--config", "configs/cifar100_alexnet.toml", "--set", "parallel.stages=4"],
         "16 ranks = 4 stages x 4 replicas"),
        (["--config", "configs/cifar10_conv2.toml"], "16 ranks = 4 stages x 4 replicas"),
    ]
    for args, layout in cases:
        proc = run(["bash", "launch/slurm.sbatch", *args], timeout=60, env=env)
        assert proc.returncode == 0, tail(proc)
        words = proc.stdout.split()
        assert words[:6] == ["srun", "torchrun", "--nnodes", "2", "--nproc-per-node", "8"], proc.stdout
        assert words[-len(args):] == args, proc.stdout
        notes = [line for line in proc.stderr.splitlines() if line.startswith("launch/slurm.sbatch:")]
        assert notes == [f"launch/slurm.sbatch: {layout}"], tail(proc)  # replicas divide 8: no cross-node note

    # 4 GPUs per node, 1 stage x 8 replicas: the stage's replicas span both nodes, and it says so
    wide = run(["bash", "launch/slurm.sbatch", "--set", "parallel.stages=1"], timeout=60,
               env=_slurm_env(tmp_path / "bin", 2, 4))
    assert wide.returncode == 0 and wide.stdout.startswith("srun torchrun"), tail(wide)
    assert "8 ranks = 1 stage x 8 replicas" in wide.stderr and "across nodes" in wide.stderr, tail(wide)


def test_slurm_script_refuses_a_bad_layout_before_srun(tmp_path):
    """Pinpoints launch/slurm.sbatch letting a layout that cannot work reach srun: more stages than
    blocks, a parallel.replicas that does not divide the ranks, or a batch the replicas x
    micro-batches do not divide must exit 2 with the library's message and never call srun."""
    env = _slurm_env(tmp_path / "bin", 2, 8)
    cases = [
        (["--config", "configs/cifar10_conv2.toml", "--set", "parallel.stages=8"],
         "8 pipeline stages but the model has only 4 blocks"),
        (["--config", "configs/cifar100_alexnet.toml", "--set", "parallel.stages=3"],
         "parallel.stages = 3 does not divide the world size (16)"),
        (["--config", "configs/cifar10_conv2.toml", "--set", "data.batch_size=120", "--set", "parallel.microbatches=4"],
         "data.batch_size (120) must be divisible by parallel.replicas (4) x parallel.microbatches (4) = 16"),
    ]
    for args, message in cases:
        proc = run(["bash", "launch/slurm.sbatch", *args], timeout=60, env=env)
        assert proc.returncode == 2 and "srun" not in proc.stdout, tail(proc)
        err = " ".join(proc.stderr.split())
        assert message in err, tail(proc)
        assert "launch/slurm.sbatch: not started (2 nodes x 8 GPUs = 16 ranks" in err, tail(proc)


def test_slurm_defaults_fit_every_shipped_config():
    """Pinpoints an #SBATCH default (or the GPUS_PER_NODE fallback) whose rank count some shipped
    config cannot be laid out on (`sbatch launch/slurm.sbatch --config configs/X.toml` would stop
    before srun), checked with the same resolve_layout that plan and train use."""
    from parallel_dkp.plan import make_plan, plan_layout

    text = (LAUNCH / "slurm.sbatch").read_text()
    nodes, gpus = _sbatch_default(text, "nodes"), _sbatch_default(text, "gpus-per-node")
    assert f"SLURM_GPUS_ON_NODE:-{gpus}}}" in text, "GPUS_PER_NODE's fallback differs from --gpus-per-node"
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert configs
    refused = {}
    for path in configs:
        cfg = load_config(path)
        try:
            layout = plan_layout(cfg, make_plan(cfg), nodes * gpus)
        except ValueError as err:
            refused[path.name] = str(err)
        else:
            assert layout.world_size == nodes * gpus
    assert not refused, f"{nodes} x {gpus} ranks cannot run these configs: {refused}"


# --------------------------------------------------------------------------- plan --world-size


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    """``parallel-dkp plan ARGS`` in this process: (exit code, stdout, stderr with lines joined)."""
    from parallel_dkp.cli import main

    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


@pytest.mark.parametrize("args, world_size, expected", [
    (["--config", "configs/cifar100_alexnet.toml"], 16, (8, 2)),
    (["--config", "configs/cifar100_alexnet.toml", "--set", "parallel.stages=4"], 16, (4, 4)),
    (["--config", "configs/cifar100_alexnet.toml", "--set", "parallel.replicas=8"], 16, (2, 8)),
    (["--config", "configs/cifar10_conv2.toml"], 6, (3, 2)),
    (["--config", "configs/cifar10_conv2.toml"], 3, (3, 1)),
    (["--set", "parallel.partition=[1, 3]"], 8, (2, 4)),
    (["--set", "model.name=vit", "--set", "model.depth=6"], 16, (8, 2)),
])
def test_plan_world_size_prints_stages_and_replicas(capsys, args, world_size, expected):
    """Pinpoints `plan --world-size N` printing another layout than resolve_layout's (stages = the
    largest divisor of N <= the blocks, or what parallel.stages/replicas/partition fix), or
    anything but "STAGES REPLICAS" on stdout (the launchers read it)."""
    code, out, err = _plan(capsys, *args, "--world-size", str(world_size))
    assert code == 0, err
    assert out == f"{expected[0]} {expected[1]}\n", out


def test_plan_world_size_json_gives_the_layout(capsys):
    """Pinpoints `plan --world-size N --json` losing a key or giving values other than the text form."""
    code, out, err = _plan(capsys, "--config", "configs/cifar100_alexnet.toml", "--world-size", "16", "--json")
    assert code == 0, err
    assert json.loads(out) == {"model": "alexnet", "num_blocks": 8, "max_stages": 8, "world_size": 16, "stages": 8,
                               "replicas": 2}
    code, out, err = _plan(capsys, "--set", "model.name=vit", "--set", "model.depth=6", "--json")
    assert code == 0, err
    assert json.loads(out) == {"model": "vit", "num_blocks": 8, "max_stages": 8}


@pytest.mark.parametrize("args, world_size, message", [
    (["--set", "parallel.stages=8"], 8, "8 pipeline stages but the model has only 4 blocks"),
    ([], 5, "data.batch_size (128) must be divisible by parallel.replicas (5) x parallel.microbatches (1) = 5"),
    (["--set", "parallel.stages=2", "--set", "parallel.replicas=2"], 8,
     "parallel.stages (2) x parallel.replicas (2) = 4 ranks, but the world size is 8"),
    (["--set", "parallel.partition=[1, 3]", "--set", "parallel.stages=3"], 6,
     "parallel.partition [1, 3] has 2 stages but parallel.stages = 3"),
])
def test_plan_world_size_refuses_a_bad_layout_with_exit_code_2(capsys, args, world_size, message):
    """Pinpoints `plan --world-size N` accepting a layout train would refuse, or refusing it
    without resolve_layout's message, with an exit code other than 2, or with anything on stdout
    (a launcher would read it as a layout); --json changes none of that."""
    for extra in ([], ["--json"]):
        code, out, err = _plan(capsys, *args, "--world-size", str(world_size), *extra)
        assert (code, out) == (2, ""), (code, out, err)
        assert f"config error: {world_size} ranks:" in err and message in err, err


def test_plan_world_size_must_be_a_positive_count(capsys):
    """Pinpoints `plan --world-size 0` (or a word) being accepted instead of a usage error (exit 2)."""
    for value in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as stop:
            _plan(capsys, "--world-size", value)
        assert stop.value.code == 2
        assert "not a positive number of ranks" in capsys.readouterr().err


def test_plan_text_names_the_stage_limit_and_the_world_size_option(capsys):
    """Pinpoints the human-readable plan still promising a rank cap, or losing the stage limit."""
    code, out, err = _plan(capsys, "--config", "configs/cifar100_alexnet.toml")
    assert code == 0, err
    assert "stages: at most 8" in out and "--world-size N" in out, out
    assert "ranks: at most" not in out, out
    code, out, err = _plan(capsys, "--set", "parallel.partition=[1, 3]")
    assert code == 0 and "stages: exactly 2" in out, out


# --------------------------------------------------------------------------- accelerate


@pytest.mark.multirank
def test_accelerate_cpu_config_runs_two_ranks(tmp_path):
    """Pinpoints `accelerate launch --config_file launch/accelerate_cpu.yaml` not starting two real
    ranks on the CPU here (world_size must be 2 in metrics.jsonl, not a silent single process)."""
    out = tmp_path / "acc"
    proc = run([*ACCELERATE, "--config_file", "launch/accelerate_cpu.yaml", "--main_process_port", str(free_port()),
                "-m", "parallel_dkp", "train", *SMALL, "--set", "run.max_steps=2", "--set", f"run.out_dir={out}"])
    assert proc.returncode == 0, tail(proc)
    rows = metrics_rows(out)
    assert len(rows) == 1 and rows[0]["world_size"] == 2 and rows[0]["train_examples"] == 2 * 16, rows
    assert proc.stderr.count("epoch 1: train loss") == 1, tail(proc)


ENV_PROBE = "echo probe RANK=${RANK-unset} WORLD_SIZE=${WORLD_SIZE-unset} LOCAL_RANK=${LOCAL_RANK-unset} " \
            "MASTER_ADDR=${MASTER_ADDR-unset}"


def accelerate_probe(config: Path) -> list[dict[str, str]]:
    """Launch a shell (no python) through accelerate: one dict of the variables that parallel_dkp
    reads per process that accelerate started."""
    proc = run([*ACCELERATE, "--config_file", str(config), "--main_process_port", str(free_port()),
                "--no_python", "sh", "-c", ENV_PROBE], timeout=120)
    assert proc.returncode == 0, tail(proc)
    lines = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("probe ")]
    return [dict(word.split("=", 1) for word in words) for words in lines]


@pytest.mark.multirank
def test_accelerate_multigpu_config_gives_each_rank_its_environment():
    """Pinpoints launch/accelerate_multigpu.yaml not being accepted by the installed accelerate, or
    not starting num_processes ranks each with RANK/WORLD_SIZE/LOCAL_RANK (checked with a shell in
    place of the training, so no GPU is needed)."""
    probes = accelerate_probe(LAUNCH / "accelerate_multigpu.yaml")
    assert sorted(int(p["RANK"]) for p in probes) == list(range(8)), probes
    assert {p["WORLD_SIZE"] for p in probes} == {"8"} and {p["MASTER_ADDR"] for p in probes} == {"127.0.0.1"}
    assert sorted(int(p["LOCAL_RANK"]) for p in probes) == list(range(8))


@pytest.mark.multirank
def test_accelerate_multi_cpu_type_starts_a_single_process(tmp_path):
    """Pins the reason launch/accelerate_cpu.yaml says MULTI_GPU: with distributed_type MULTI_CPU
    and no MPI hostfile, accelerate (1.15.0) starts ONE process with no RANK/WORLD_SIZE, so a run
    would silently be single-process. If this fails, accelerate changed: revisit
    docs/launching.md and the CPU config."""
    config = tmp_path / "multi_cpu.yaml"
    text = (LAUNCH / "accelerate_cpu.yaml").read_text()
    config.write_text(text.replace("distributed_type: MULTI_GPU", "distributed_type: MULTI_CPU")
                      .replace("use_cpu: false", "use_cpu: true"))
    probes = accelerate_probe(config)
    assert probes == [{"RANK": "unset", "WORLD_SIZE": "unset", "LOCAL_RANK": "unset", "MASTER_ADDR": "127.0.0.1"}]
