"""CPU ranks on one host each get their own cores (``run.bind_cores``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_cli import SMOKE, _torchrun

from parallel_dkp.parallel.affinity import core_share, host_share

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="sched_setaffinity: Linux only")


def test_core_share_splits_the_cores_into_equal_consecutive_shares():
    cores = [7, 1, 3, 5, 2, 4, 6, 0]  # as sched_getaffinity may list them
    assert [core_share(cores, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [core_share(cores, r, 3) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]  # 6, 7 unused
    assert [core_share([2, 9], r, 2) for r in range(2)] == [[2], [9]]
    assert core_share([0, 1], 2, 3) is None  # fewer cores than ranks: left to the scheduler
    with pytest.raises(ValueError, match="outside 0..1"):
        core_share([0, 1], 2, 2)


def test_ranks_of_a_host_share_its_cores_unless_their_launcher_placed_them():
    """Pinpoints a binding that halves the cores of ranks a launcher had already placed (Slurm's
    --cpu-bind), or counts another host's ranks as neighbours."""
    both = (0, 1, 2, 3)
    same = [("a", both), ("a", both), ("b", both), ("b", both), ("a", both)]
    assert [host_share(same, r) for r in range(5)] == [(0, 3), (1, 3), (0, 2), (1, 2), (2, 3)]
    placed = [("a", (0, 1)), ("a", (2, 3)), ("b", both), ("b", both)]
    assert host_share(placed, 0) is None and host_share(placed, 1) is None
    assert host_share(placed, 3) == (1, 2)


PROBE = """
import os, sys, threading, torch
from parallel_dkp.parallel.affinity import bind_local_rank
torch.set_num_threads(len(os.sched_getaffinity(0)))
started = threading.Event(); stop = threading.Event()
def helper():  # a thread that exists before the binding, as gloo's or OpenMP's may
    started.set(); stop.wait()
t = threading.Thread(target=helper); t.start(); started.wait()
cores = bind_local_rank(int(sys.argv[1]), int(sys.argv[2]))
print(cores, sorted(os.sched_getaffinity(0)), sorted(os.sched_getaffinity(t.native_id)), torch.get_num_threads())
stop.set(); t.join()
"""


@needs_affinity
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs 2 cores to give 2 ranks one each")
def test_binding_covers_threads_started_before_it_and_caps_intra_op_threads():
    """Pinpoints a binding that moves only the calling thread (helper threads would still roam
    every core) or leaves torch with more threads than cores."""
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // 2
    for rank in range(2):
        proc = subprocess.run([sys.executable, "-c", PROBE, str(rank), "2"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        mine = cores[rank * share:(rank + 1) * share]
        assert proc.stdout.split("] ")[:3] == [str(mine)[:-1]] * 3
        assert int(proc.stdout.split()[-1]) == share
    proc = subprocess.run([sys.executable, "-c", PROBE, "0", "1"], capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith(f"None {cores} {cores}")  # one rank on the host: untouched


@pytest.mark.multirank
@needs_affinity
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs 2 cores to give 2 ranks one each")
@pytest.mark.parametrize("bind", [True, False])
def test_torchrun_ranks_run_on_their_own_cores(tmp_path, bind):
    """Pinpoints CPU ranks that share cores by default (or that are bound although
    ``run.bind_cores=false``): the cores each rank ran on, as ``phases.json`` records them."""
    out = tmp_path / "run"
    proc = _torchrun(2, "train", *SMOKE, "--set", "rule.name=dkp", "--set", "run.max_steps=2", "--set",
                     "parallel.microbatches=2", "--set", f"run.out_dir={out}", "--set", "run.profile=true",
                     "--set", f"run.bind_cores={str(bind).lower()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = [r["cores"] for r in json.loads((out / "phases.json").read_text())["ranks"]]
    everything = sorted(os.sched_getaffinity(0))
    if bind:
        share = len(everything) // 2
        assert cores == [everything[:share], everything[share:2 * share]]
    else:
        assert cores == [everything, everything]
