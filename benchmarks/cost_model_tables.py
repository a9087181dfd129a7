"""Predicted layer-parallel speed-ups to 64 ranks, from measured per-block costs.

For each network, every block's phases are measured once on this machine (one micro-batch,
``--threads`` threads: the per-rank budget), and the cost model (parallel_dkp/parallel/costmodel.py)
replays dkp's direct schedule and bp's GPipe/1F1B schedules for N = 1 ... 64 ranks and M
micro-batches of that size (the global batch is M micro-batches, so the comparison at one M is at
one global batch). vit and convdeep are stacks of equal blocks: their deeper versions repeat the
measured middle block (``BlockCosts.repeated``), so N can reach 64. Writes a Markdown table per
network and one PNG of predicted speed-up against N per network.

Stages x replicas (``--replicas``): the same pipelines, each replica on its own batch of M
micro-batches (weak scaling: the global batch grows with the replicas), with each stage's
gradients, learned feedback and BN statistics averaged over its replicas by a ring all-reduce
on the measured link, started when the stage's last update is done. The table gives the
predicted throughput over one rank, ``R · T(1 x 1) / T(S x R)``, for dkp and bp 1F1B.

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
from parallel_dkp.parallel.costs import averaged_bytes, measure_block_phases

NETWORKS = {  # name: (overrides, input shape, classes); conv nets in channels-last, as benchmarks/unlocking.sh
    "conv2": (["model.name=conv2", "run.channels_last=true"], (1, 28, 28), 10),
    "alexnet": (["model.name=alexnet", "data.image_size=224", "run.channels_last=true"], (3, 224, 224), 200),
    "vit": (["model.name=vit"], (1, 28, 28), 10),
    "convdeep": (["model.name=convdeep", "run.channels_last=true"], (1, 28, 28), 10),
}
RANKS = (1, 2, 4, 8, 16, 32, 64)
REPLICAS = (1, 2, 4, 8, 16)
MESH_NETWORKS = ("conv2", "alexnet", "vit")


def _config(name: str):
    overrides, shape, classes = NETWORKS[name]
    return load_config(None, [*overrides, "data.name=synthetic", f"data.synthetic_shape={list(shape)}",
                              f"data.synthetic_classes={classes}", "rule.name=dkp"])


def with_averaged_bytes(name: str, costs: costmodel.BlockCosts) -> costmodel.BlockCosts:
    """``costs`` with the bytes replicas average, counted on the network (block costs saved before
    they were measured lack them; counting needs no timing)."""
    if any(costs.weight_bytes):
        return costs
    from parallel_dkp.models import block_output_shapes, build_blocks
    from parallel_dkp.parallel.stage import Stage
    from parallel_dkp.rules import build_rule

    cfg, (_, shape, classes) = _config(name), NETWORKS[name]
    blocks = build_blocks(cfg.model, input_shape=shape, num_classes=classes, seed=0)
    stage = Stage(list(blocks), indices=range(len(blocks)), num_blocks=len(blocks), rule=build_rule(cfg.rule),
                  out_shapes=block_output_shapes(blocks, shape), num_classes=classes, seed=0)
    weights, feedback = averaged_bytes(stage)
    return costmodel.BlockCosts.from_dict({**costs.as_dict(), "weight_bytes": weights, "feedback_bytes": feedback})


def measure(name: str, microbatch: int, repeats: int) -> costmodel.BlockCosts:
    _, shape, classes = NETWORKS[name]
    cfg = _config(name)
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


def mesh_table(name: str, costs: costmodel.BlockCosts, link: costmodel.Link, m: int) -> str:
    """Predicted throughput over one rank for stages x replicas, dkp and bp 1F1B, at M = ``m``."""
    deep = name in ("vit", "convdeep")
    net = costs.repeated(max(RANKS)) if deep else costs
    base = {method: costmodel.predict(net, ranks=1, microbatches=m, method=method, link=link)
            for method in ("direct", "1f1b")}
    head = (f"### {name}: stages x replicas, M = {m} per replica ({net.num_blocks} blocks; "
            f"{sum(net.weight_bytes) / 2**20:.1f} MiB of weights, {sum(net.feedback_bytes) / 2**20:.1f} MiB of "
            "learned feedback averaged per step)\n\n"
            "Throughput over one rank, dkp / bp 1F1B (ideal: stages x replicas).\n\n"
            "| stages \\ replicas | " + " | ".join(str(r) for r in REPLICAS) + " |\n"
            "|---|" + "---|" * len(REPLICAS))
    rows = []
    for n in RANKS:
        if n > net.num_blocks:
            continue
        cells = []
        for r in REPLICAS:
            t = {method: costmodel.predict(net, ranks=n, microbatches=m, method=method, link=link, replicas=r)
                 for method in ("direct", "1f1b")}
            cells.append(f"{r * base['direct'] / t['direct']:.1f} / {r * base['1f1b'] / t['1f1b']:.1f}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows) + "\n"


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
    parser.add_argument("--mesh-microbatches", type=int, default=8,
                        help="M per replica of the stages x replicas tables (default 8)")
    args = parser.parse_args()
    link = costmodel.Link()
    if args.bench:
        measured = json.loads(Path(args.bench).read_text())["cost_model"]["link"]
        link = costmodel.Link(measured["latency_s"], measured["bandwidth_Bps"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    microbatches = [int(m) for m in args.microbatches.split(",")]
    sections, mesh_sections, costs_json = [], [], {}
    saved = json.loads(Path(args.costs).read_text()) if args.costs else None
    if saved:
        args.microbatch = saved["microbatch"]
    for name in args.networks.split(","):
        if saved:
            costs = costmodel.BlockCosts.from_dict(saved["networks"][name])
        else:
            costs = measure(name, args.microbatch, args.repeats)
        costs = with_averaged_bytes(name, costs)
        costs_json[name] = costs.as_dict()
        text, curves = table(name, costs, link, microbatches)
        sections.append(text)
        plot(name, curves, out / f"predicted_speedup_{name}.png")
        print(text, flush=True)
        if name in MESH_NETWORKS:
            mesh_sections.append(mesh_table(name, costs, link, args.mesh_microbatches))
            print(mesh_sections[-1], flush=True)
    threads = saved["threads"] if saved else torch.get_num_threads()  # of the measurement
    header = (f"Predicted by benchmarks/cost_model_tables.py: micro-batch {args.microbatch}, "
              f"{threads} thread(s), link {link.latency_s * 1e6:.0f} µs + "
              f"{link.bandwidth_Bps / 1e9:.2f} GB/s, torch {torch.__version__}.\n\n")
    (out / "predictions.md").write_text(header + "\n".join(sections))
    (out / "predictions_mesh.md").write_text(header + "\n".join(mesh_sections))
    (out / "block_costs.json").write_text(json.dumps({"microbatch": args.microbatch, "threads": threads,
                                                      "link": link.__dict__, "networks": costs_json}, indent=2))


if __name__ == "__main__":
    main()
