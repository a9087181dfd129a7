"""Where a training step's time goes, per aten op, for two rules side by side.

    python benchmarks/profile_step.py --rules bp,dkp [--steps 10] [--set key=value ...]

Profiles single-process steps of ``configs/default.toml`` (conv2, Fashion-MNIST, batch 128) with
``torch.profiler`` and prints each rule's self CPU time per step of the costliest ops.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from parallel_dkp.config import load_config
from parallel_dkp.parallel.distributed import DistContext
from parallel_dkp.train import build_job, train_step


def op_times(rule: str, overrides: list[str], steps: int) -> dict[str, float]:
    cfg = load_config("configs/default.toml", [f"rule.name={rule}", "data.train_limit=1024", *overrides])
    job = build_job(cfg, DistContext())
    x, y = next(iter(job.train_loader))
    for _ in range(3):
        train_step(job, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(job, x, y)
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rules", default="bp,dkp")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rules = args.rules.split(",")
    times = {rule: op_times(rule, args.overrides, args.steps) for rule in rules}
    ops = defaultdict(float)
    for t in times.values():
        for op, ms in t.items():
            ops[op] = max(ops[op], ms)
    top = sorted(ops, key=ops.get, reverse=True)[:14]
    print(f"| op (self CPU ms per step) | {' | '.join(rules)} |")
    print(f"|---|{'---|' * len(rules)}")
    for op in top:
        print(f"| `{op}` | {' | '.join(f'{times[r].get(op, 0.0):.1f}' for r in rules)} |")
    print(f"| **total** | {' | '.join(f'{sum(times[r].values()):.1f}' for r in rules)} |")


if __name__ == "__main__":
    main()
