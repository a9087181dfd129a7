"""How cheap can a direct rule's local update be? Per block: forward F, backprop backward B,
dkp's local update U (as the bench and the cost model measure them), and the floor W of any
local update, the block's backward with its input cut (weight gradients only, the signal given).

    OMP_NUM_THREADS=1 python benchmarks/update_floor.py [--models convdeep,vit] [--repeats 7]

Prints, per network, the per-block table and the ideal 2-rank ratios of the issue's formulas,
``2M(F+U)/(M(F+U)+F)`` and ``(M(F+U)+F)/((M+1)(F+B))``, with U as measured and with U = W (the
direct products ``e·B_j`` and ``eᵀa_j`` for free). Synthetic 1x28x28 data, batch 128, M = 4
(micro-batch 32), conv nets channels-last as in ``benchmarks/unlocking.sh``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from parallel_dkp.config import load_config
from parallel_dkp.cpu_memory import keep_freed_memory
from parallel_dkp.models import build_blocks
from parallel_dkp.parallel.costs import measure_block_phases


def weight_grad_floor(blocks, x: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of each block's backward from a given output gradient, its input cut."""
    floors = []
    for block in blocks:
        out = block(x.detach())
        grad = torch.randn_like(out)
        samples = []
        for _ in range(repeats + 1):
            out = block(x.detach())
            start = time.perf_counter()
            out.backward(grad)
            samples.append(time.perf_counter() - start)
        block.zero_grad(set_to_none=True)
        floors.append(statistics.median(samples[1:]))
        x = out.detach()
    return floors


def ideal(f: float, u: float, b: float, m: int) -> tuple[float, float]:
    return 2 * m * (f + u) / (m * (f + u) + f), (m * (f + u) + f) / ((m + 1) * (f + b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="convdeep,vit")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()  # as training processes do (run.keep_freed_memory)
    torch.manual_seed(0)
    for model in args.models.split(","):
        layout = "false" if model == "vit" else "true"
        cfg = load_config("configs/default.toml", [f"model.name={model}", "rule.name=dkp", "data.name=synthetic",
                                                   f"run.channels_last={layout}", "data.synthetic_shape=[1, 28, 28]"])
        micro = cfg.data.batch_size // args.microbatches
        x, y = torch.randn(micro, 1, 28, 28), torch.randint(0, 10, (micro,))
        costs = measure_block_phases(cfg, x, y, num_classes=10, total=cfg.data.batch_size, device=torch.device("cpu"),
                                     repeats=args.repeats)
        blocks = build_blocks(cfg.model, input_shape=(1, 28, 28), num_classes=10, seed=0)
        if cfg.run.channels_last:
            blocks = blocks.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        floor = weight_grad_floor(blocks, x, args.repeats)
        print(f"\n{model}, micro-batch {micro}, {torch.get_num_threads()} thread(s), ms per block:")
        print("| block | F | B (backprop) | U (dkp update) | W (floor) | U / F | B / F | W / F |")
        print("|---|---|---|---|---|---|---|---|")
        for i, (f, b, u, w) in enumerate(zip(costs.forward, costs.backward, costs.update, floor)):
            print(f"| {i} | {f * 1e3:.2f} | {b * 1e3:.2f} | {u * 1e3:.2f} | {w * 1e3:.2f} | {u / f:.2f} | {b / f:.2f} "
                  f"| {w / f:.2f} |")
        f, b, u, w = (sum(v) for v in (costs.forward, costs.backward, costs.update, floor))
        print(f"| all | {f * 1e3:.2f} | {b * 1e3:.2f} | {u * 1e3:.2f} | {w * 1e3:.2f} | {u / f:.2f} | {b / f:.2f} "
              f"| {w / f:.2f} |")
        m = args.microbatches
        for label, update in (("U as measured", u), ("U = W (direct products free)", w)):
            speedup, over_1f1b = ideal(f, update, b, m)
            print(f"ideal at N = 2, M = {m}, {label}: unlocking {speedup:.2f}, dkp / bp 1F1B {over_1f1b:.3f}")


if __name__ == "__main__":
    main()
