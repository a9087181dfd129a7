"""``parallel-dkp plan``: the configured model's blocks and the largest rank count that can run it.

Every rank owns at least one block, so a run needs ``world size <= number of blocks`` (with an
explicit ``parallel.partition``, exactly one rank per entry). ``plan`` answers that from the
config alone, before any process is launched: no dataset is read and no parameter is allocated
(block specs are lazy factories, built here for a dummy input that every model accepts; the
number of blocks does not depend on the input size). The launchers in ``launch/`` call
``parallel-dkp plan --max-ranks <train arguments>`` to size their jobs.

    parallel-dkp plan --config configs/cifar10_conv2.toml            # the block list
    parallel-dkp plan --config configs/cifar10_conv2.toml --max-ranks   # 4
    parallel-dkp plan --config configs/cifar100_alexnet.toml --json
    # {"model": "alexnet", "num_blocks": 8, "max_ranks": 8}
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from parallel_dkp.config import Config


@dataclass(frozen=True)
class Plan:
    """What a launcher needs to know about a config: the blocks and the usable world sizes."""

    model: str
    blocks: tuple[str, ...]
    """Block names, in order (the last one is the output block)."""
    max_ranks: int
    """Largest world size that can run this config: one block or more per rank."""
    partition: tuple[int, ...] = ()
    """``parallel.partition`` when given: then the world size must be exactly ``len(partition)``."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def as_json(self) -> dict:
        return {"model": self.model, "num_blocks": self.num_blocks, "max_ranks": self.max_ranks}


def make_plan(cfg: Config) -> Plan:
    """The plan of ``cfg``; ValueError (with the fix) when no world size can run it."""
    from parallel_dkp.models.blocks import block_specs, num_blocks
    from parallel_dkp.parallel.partition import explicit_partition

    count = num_blocks(cfg.model)
    # The same dummy input as num_blocks: names, like the count, do not depend on the data.
    dummy = (3, 224, 224) if cfg.model.name == "alexnet" else (3, 32, 32)
    names = tuple(spec.name for spec in block_specs(cfg.model, input_shape=dummy, num_classes=10))
    if len(names) != count:  # pragma: no cover - the two would have to diverge in blocks.py
        raise RuntimeError(f"{cfg.model.name}: {len(names)} block specs but num_blocks says {count}")
    partition = tuple(cfg.parallel.partition)
    if partition:
        # Raises the runtime's own message when the counts do not add up to the model's blocks.
        explicit_partition(partition, num_blocks=count, world_size=len(partition))
        return Plan(cfg.model.name, names, max_ranks=len(partition), partition=partition)
    return Plan(cfg.model.name, names, max_ranks=count)


def format_plan(plan: Plan) -> str:
    """The human-readable answer of ``parallel-dkp plan``."""
    lines = [f"model {plan.model}: {plan.num_blocks} blocks"]
    lines += [f"  block {i}: {name}" for i, name in enumerate(plan.blocks)]
    if plan.partition:
        lines.append(f"ranks: exactly {plan.max_ranks} (parallel.partition = {list(plan.partition)}, "
                     "one entry per rank)")
    else:
        lines.append(f"ranks: at most {plan.max_ranks} (every rank needs at least one block; "
                     "parallel.partition = [...] sets the split, else it is balanced by measured cost)")
    bound = "=" if plan.partition else "<="
    lines.append(f"launch: torchrun --nproc-per-node N -m parallel_dkp train ... with N {bound} {plan.max_ranks}; "
                 f"under Slurm, nodes x GPUs per node {bound} {plan.max_ranks}")
    return "\n".join(lines)


def add_subparser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``parallel-dkp plan`` to ``sub``, after ``train``: it takes every ``train`` option.

    The launchers pass the user's train arguments on unchanged, so ``plan`` accepts all of them
    (``--config``/``--set`` decide the plan; the others, e.g. ``--resume``, change nothing here).
    """
    train = sub.choices.get("train")
    plan = sub.add_parser(
        "plan",
        parents=[train] if train is not None else [],
        add_help=train is None,  # the parent brings -h
        help="show the model's blocks and the largest number of ranks it can run on (loads no data)",
        description="Resolve the config as train would and print the model's block list and the largest "
                    "world size that can run it (every rank owns at least one block). Reads no dataset. "
                    "Takes train's options: --config and --set decide the answer, the others are accepted "
                    "and ignored, so a launcher can pass its train arguments on unchanged. The launchers "
                    "in launch/ use --max-ranks to size their jobs.",
    )
    if train is None:
        plan.add_argument("--config", "-c", help="TOML file (see configs/); defaults apply without one")
        plan.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override one config value, as for train (repeatable)")
    output = plan.add_mutually_exclusive_group()
    output.add_argument("--max-ranks", action="store_true", help="print only the largest usable rank count")
    output.add_argument("--json", action="store_true",
                        help='print {"model": ..., "num_blocks": ..., "max_ranks": ...} as JSON')
    return plan


def run_plan(args: argparse.Namespace, cfg: Config, console: Console) -> int:
    """Print the plan of ``cfg`` in the form ``args`` asks for; 2 with the message when none fits."""
    try:
        plan = make_plan(cfg)
    except ValueError as err:
        console.print(f"[bold red]config error:[/] {escape(str(err))}")
        return 2
    if args.max_ranks:
        print(plan.max_ranks)
    elif args.json:
        print(json.dumps(plan.as_json()))
    else:
        print(format_plan(plan))
    return 0
