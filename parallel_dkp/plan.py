"""``parallel-dkp plan``: the configured model's blocks, and the stages x replicas layout of N ranks.

The ranks form a grid of ``stages`` x ``replicas`` (``parallel_dkp.parallel.mesh``): every
pipeline stage owns at least one block, so there are at most as many stages as the model has
blocks (exactly ``len(parallel.partition)`` when that is set), and any further ranks become
data-parallel replicas. Any world size works as long as
:func:`~parallel_dkp.parallel.mesh.resolve_layout` accepts it; ``plan --world-size N`` asks it,
with the config's ``parallel.stages``/``parallel.replicas``/``parallel.partition``,
``data.batch_size`` and ``parallel.microbatches``, exactly as ``train`` will.

``plan`` answers from the config alone, before any process is launched: no dataset is read and no
parameter is allocated (block specs are lazy factories, built here for a dummy input that every
model accepts; the number of blocks does not depend on the input size). The launchers in
``launch/`` call ``parallel-dkp plan --world-size N <train arguments>`` before they start anything.

    parallel-dkp plan --config configs/cifar10_conv2.toml                      # the block list
    parallel-dkp plan --config configs/cifar100_alexnet.toml --json
    # {"model": "alexnet", "num_blocks": 8, "max_stages": 8}
    parallel-dkp plan --config configs/cifar100_alexnet.toml --world-size 16   # 8 2 (stages replicas)
    parallel-dkp plan --config configs/cifar100_alexnet.toml --world-size 16 --json
    # {"model": "alexnet", "num_blocks": 8, "max_stages": 8, "world_size": 16, "stages": 8, "replicas": 2}
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from parallel_dkp.config import Config

if TYPE_CHECKING:
    from parallel_dkp.parallel.mesh import Layout


@dataclass(frozen=True)
class Plan:
    """What a launcher needs to know about a config: the blocks and how many stages they allow."""

    model: str
    blocks: tuple[str, ...]
    """Block names, in order (the last one is the output block)."""
    max_stages: int
    """Most pipeline stages this config can have: one block or more per stage."""
    partition: tuple[int, ...] = ()
    """``parallel.partition`` when given: then there are exactly ``len(partition)`` stages."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def as_json(self) -> dict:
        return {"model": self.model, "num_blocks": self.num_blocks, "max_stages": self.max_stages}


def make_plan(cfg: Config) -> Plan:
    """The plan of ``cfg``; ValueError (with the fix) when its ``parallel.partition`` cannot fit."""
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
        return Plan(cfg.model.name, names, max_stages=len(partition), partition=partition)
    return Plan(cfg.model.name, names, max_stages=count)


def plan_layout(cfg: Config, plan: Plan, world_size: int) -> Layout:
    """The stages x replicas layout ``train`` uses for ``world_size`` ranks (``resolve_layout``
    with the config's values); ValueError with the library's remedy when none fits."""
    from parallel_dkp.parallel.mesh import resolve_layout

    return resolve_layout(
        world_size=world_size, num_blocks=plan.num_blocks, stages=cfg.parallel.stages,
        replicas=cfg.parallel.replicas, partition=cfg.parallel.partition, batch_size=cfg.data.batch_size,
        microbatches=cfg.parallel.microbatches,
    )


def format_plan(plan: Plan, cfg: Config) -> str:
    """The human-readable answer of ``parallel-dkp plan``."""
    lines = [f"model {plan.model}: {plan.num_blocks} blocks"]
    lines += [f"  block {i}: {name}" for i, name in enumerate(plan.blocks)]
    if plan.partition:
        lines.append(f"stages: exactly {plan.max_stages} (parallel.partition = {list(plan.partition)}, "
                     "one entry per stage)")
    else:
        lines.append(f"stages: at most {plan.max_stages} (every stage owns at least one block; "
                     "parallel.partition = [...] sets the split, else it is balanced by measured cost)")
    par = cfg.parallel
    lines.append(f"ranks: any world size = stages x replicas that fits (parallel.stages = {par.stages}, "
                 f"parallel.replicas = {par.replicas}; 0 = chosen: as many stages as the blocks allow, "
                 f"the rest replicas; data.batch_size = {cfg.data.batch_size} must be divisible by "
                 f"replicas x parallel.microbatches = replicas x {par.microbatches})")
    lines.append("layout of N ranks: parallel-dkp plan --world-size N [train options] "
                 "(rank = stage * replicas + replica)")
    return "\n".join(lines)


def _world_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of ranks")
    return value


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
        help="show the model's blocks, or the stages x replicas layout of N ranks (loads no data)",
        description="Resolve the config as train would and print the model's block list and the largest "
                    "number of pipeline stages (every stage owns at least one block; further ranks become "
                    "data-parallel replicas). With --world-size N: the layout train would use for N ranks, "
                    "or the reason none fits (exit code 2). Reads no dataset. Takes train's options: "
                    "--config and --set decide the answer, the others are accepted and ignored, so a "
                    "launcher can pass its train arguments on unchanged; the launchers in launch/ ask "
                    "--world-size before they start anything.",
    )
    if train is None:
        plan.add_argument("--config", "-c", help="TOML file (see configs/); defaults apply without one")
        plan.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override one config value, as for train (repeatable)")
    plan.add_argument("--world-size", type=_world_size, metavar="N",
                      help="print the layout of N ranks as 'STAGES REPLICAS' (rank = stage * replicas + replica); "
                           "exit code 2 with the reason when N ranks cannot run this config")
    plan.add_argument("--json", action="store_true",
                      help='print {"model", "num_blocks", "max_stages"} as JSON, with "world_size", "stages" '
                           'and "replicas" added under --world-size')
    return plan


def run_plan(args: argparse.Namespace, cfg: Config, console: Console) -> int:
    """Print the plan of ``cfg`` in the form ``args`` asks for; 2 with the message when none fits."""
    try:
        plan = make_plan(cfg)
    except ValueError as err:
        console.print(f"[bold red]config error:[/] {escape(str(err))}")
        return 2
    if args.world_size is None:
        print(json.dumps(plan.as_json()) if args.json else format_plan(plan, cfg))
        return 0
    try:
        layout = plan_layout(cfg, plan, args.world_size)
    except ValueError as err:
        console.print(f"[bold red]config error:[/] {args.world_size} ranks: {escape(str(err))}")
        return 2
    if args.json:
        print(json.dumps({**plan.as_json(), "world_size": layout.world_size, "stages": layout.stages,
                          "replicas": layout.replicas}))
    else:
        print(layout.stages, layout.replicas)
    return 0
