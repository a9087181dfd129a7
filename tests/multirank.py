"""Run a function on several gloo ranks (processes on 127.0.0.1), each with a hard time limit."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        traceback.print_exc()
        raise


def spawn(fn, world_size: int, *args, timeout: float = 180.0, expect_exit: dict[int, int] | None = None) -> None:
    """Start ``fn(rank, world_size, *args)`` on ``world_size`` processes; fail on error or hang.

    ``expect_exit`` maps ranks to the exit code they are meant to end with (default 0).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout}s (deadlock?)")
    expected = expect_exit or {}
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    wrong = {r: c for r, c in codes.items() if c != expected.get(r, 0)}
    assert not wrong, f"exit codes {codes}, expected {expected or 'all 0'}"
