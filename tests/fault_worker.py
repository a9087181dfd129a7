"""``parallel-dkp`` as torchrun runs it, with one fault: rank ``FAULT_RANK`` kills itself with
SIGKILL after its ``FAULT_STEP``-th training step, once (a marker file remembers it), the way an
out-of-memory killer or a lost node ends a process: no handler runs, nothing is flushed.

    torchrun --max-restarts=1 ... tests/fault_worker.py train --config ... --set ...
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import parallel_dkp.train as train_module
from parallel_dkp.cli import main

FAULT_RANK, FAULT_STEP = int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_STEP"])
MARKER = Path(os.environ["FAULT_MARKER"])

real_step, done = train_module.train_step, [0]


def step_then_die(job, x, y, **kwargs):
    result = real_step(job, x, y, **kwargs)
    done[0] += 1
    if job.ctx.rank == FAULT_RANK and done[0] == FAULT_STEP and not MARKER.exists():
        MARKER.write_text(f"killed rank {FAULT_RANK} after step {FAULT_STEP}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return result


train_module.train_step = step_then_die
sys.exit(main(sys.argv[1:]))
