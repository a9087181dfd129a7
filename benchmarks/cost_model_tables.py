"""Predicted layer-parallel speed-ups to 64 ranks, from measured per-block costs.

For each network, every block's phases are measured once on this machine (one micro-batch,
``--threads`` threads: the per-rank budget), and the cost model (parallel_dkp/parallel/costmodel.py)
replays dkp's direct schedule and bp's GPipe/1F1B schedules for N = 1 ... 64 ranks and M
micro-batches of that size (the global batch is M micro-batches, so the comparison at one M is at
one global batch). vit and convdeep are stacks of equal blocks: their deeper versions repeat the
measured middle block (``BlockCosts.repeated``), so N can reach 64. Writes a Markdown table per
network and one PNG of predicted speed-up against N per network.

    OMP_NUM_THREADS=1 python benchmarks/cost_model_tables.py --bench docs/performance/convdeep.json \
        --out docs/performance
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from parallel_dkp.config import load_config
from parallel_dkp.parallel import costmodel
from parallel_dkp.parallel.costs import measure_block_phases

NETWORKS = {  # name: (overrides, input shape, classes); conv nets in channels-last, as benchmarks/unlocking.sh
    "conv2": (["model.name=conv2", "run.channels_last=true"], (1, 28, 28), 10),
    "alexnet": (["model.name=alexnet", "data.image_size=224", "run.channels_last=true"], (3, 224, 224), 200),
    "vit": (["model.name=vit"], (1, 28, 28), 10),
    "convdeep": (["model.name=convdeep", "run.channels_last=true"], (1, 28, 28), 10),
}
RANKS = (1, 2, 4, 8, 16, 32, 64)


def measure(name: str, microbatch: int, repeats: int) -> costmodel.BlockCosts:
    overrides, shape, classes = NETWORKS[name]
    cfg = load_config(None, [*overrides, "data.name=synthetic", f"data.synthetic_shape={list(shape)}",
                             f"data.synthetic_classes={classes}"])
    torch.manual_seed(0)
    x, y = torch.randn(microbatch, *shape), torch.randint(0, classes, (microbatch,))
    return measure_block_phases(cfg, x, y, num_classes=classes, total=microbatch, device=torch.device("cpu"),
                                repeats=repeats)


def table(name: str, costs: costmodel.BlockCosts, link: costmodel.Link, microbatches: list[int]) -> tuple[str, dict]:
    deep = name in ("vit", "convdeep")
    net = costs.repeated(max(RANKS)) if deep else costs
    rows, curves = [], {}
    for m in microbatches:
        base = {method: costmodel.predict(net, ranks=1, microbatches=m, method=method, link=link)
                for method in ("direct", "1f1b")}
        for n in RANKS:
            if n > net.num_blocks:
                continue
            t = {method: costmodel.predict(net, ranks=n, microbatches=m, method=method, link=link)
                 for method in ("direct", "gpipe", "1f1b")}
            speed = base["direct"] / t["direct"]
            curves.setdefault(m, []).append((n, speed, base["1f1b"] / t["1f1b"]))
            rows.append(f"| {n} | {m} | {t['direct'] * 1e3:.1f} | {t['1f1b'] * 1e3:.1f} | {t['gpipe'] * 1e3:.1f} | "
                        f"{speed:.2f} | {base['1f1b'] / t['1f1b']:.2f} | {t['direct'] / t['1f1b']:.3f} |")
    head = (f"### {name} ({net.num_blocks} blocks{', the middle block repeated' if deep else ''})\n\n"
            "| N | M | dkp step (ms) | bp 1F1B (ms) | bp GPipe (ms) | dkp speed-up | 1F1B speed-up | dkp / 1F1B |\n"
            "|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows) + "\n", curves


def plot(name: str, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m, points in curves.items():
        ns = [p[0] for p in points]
        line, = ax.plot(ns, [p[1] for p in points], marker="o", label=f"dkp, M={m}")
        ax.plot(ns, [p[2] for p in points], marker="x", linestyle="--", color=line.get_color(), label=f"bp 1F1B, M={m}")
    top = max(p[0] for points in curves.values() for p in points)
    ax.plot([1, top], [1, top], color="grey", linewidth=0.8, label="linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("ranks N")
    ax.set_ylabel("predicted speed-up over 1 rank")
    ax.set_title(f"{name}: cost model")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", help="a `parallel-dkp bench --ranks` JSON whose measured link to use")
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--microbatch", type=int, default=32, help="examples per micro-batch (default 32)")
    parser.add_argument("--microbatches", default="8,64", help="M values to tabulate (default 8,64)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/performance")
    parser.add_argument("--costs", help="a block_costs.json this script wrote: reuse its measurements")
    args = parser.parse_args()
    link = costmodel.Link()
    if args.bench:
        measured = json.loads(Path(args.bench).read_text())["cost_model"]["link"]
        link = costmodel.Link(measured["latency_s"], measured["bandwidth_Bps"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    microbatches = [int(m) for m in args.microbatches.split(",")]
    sections, costs_json = [], {}
    saved = json.loads(Path(args.costs).read_text()) if args.costs else None
    if saved:
        args.microbatch = saved["microbatch"]
    for name in args.networks.split(","):
        if saved:
            costs = costmodel.BlockCosts.from_dict(saved["networks"][name])
        else:
            costs = measure(name, args.microbatch, args.repeats)
        costs_json[name] = costs.as_dict()
        text, curves = table(name, costs, link, microbatches)
        sections.append(text)
        plot(name, curves, out / f"predicted_speedup_{name}.png")
        print(text, flush=True)
    header = (f"Predicted by benchmarks/cost_model_tables.py: micro-batch {args.microbatch}, "
              f"{torch.get_num_threads()} thread(s), link {link.latency_s * 1e6:.0f} µs + "
              f"{link.bandwidth_Bps / 1e9:.2f} GB/s, torch {torch.__version__}.\n\n")
    (out / "predictions.md").write_text(header + "\n".join(sections))
    (out / "block_costs.json").write_text(json.dumps({"microbatch": args.microbatch, "threads": torch.get_num_threads(),
                                                      "link": link.__dict__, "networks": costs_json}, indent=2))


if __name__ == "__main__":
    main()
