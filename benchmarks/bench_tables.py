"""Markdown tables from ``parallel-dkp bench --out`` JSON files (used for docs/results.md).

    python benchmarks/bench_tables.py docs/bench/*.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    r = json.load(open(path))
    m = r["machine"]
    rules = list(r["rules"])
    head = (f"**{path}** — `{r['model']}`, batch {r['batch_size']}, M={r['microbatches']}, "
            f"{r['world_size']} rank(s), partition {r['partition']}"
            + (f", schedule {r['schedule']} (serial rules)" if r["world_size"] > 1 else "")
            + f", {m['threads_per_rank']} thread(s) per rank, {m['device_name']}, torch {m['torch']}; "
            f"median of {r['steps']} steps after {r['warmup']} warm-up.")
    ranks = range(r["world_size"])
    lines = [head, "", "| rule | step ms | ratio to " + rules[0] + " | "
             + " | ".join(f"rank {k}: fwd / upd / wait / send ms, idle" for k in ranks) + " |",
             "|---|---|---|" + "---|" * r["world_size"]]
    for rule, row in r["rules"].items():
        cells = []
        for p in r["phases_per_rank"][rule]:
            if p.get("pipeline"):
                cells.append("inside torch.distributed.pipelining")
            else:
                cells.append(f"{p['forward']*1e3:.1f} / {p['update']*1e3:.1f} / {p['wait']*1e3:.1f} / "
                             f"{p['send']*1e3:.1f}, {p['idle_fraction']:.0%}")
        ratio = row["ratio_to_" + rules[0]]
        lines.append(f"| {rule} | {row['median_s']*1e3:.1f} | {ratio:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(p) for p in sys.argv[1:]))
