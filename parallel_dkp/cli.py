"""``parallel-dkp`` command line: ``train``, ``eval``, ``bench`` and ``plan``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from parallel_dkp.analysis import report as report_command
from parallel_dkp.analysis import trials as trials_command
from parallel_dkp.config import Config, load_config
from parallel_dkp.plan import add_subparser as add_plan_subparser
from parallel_dkp.plan import run_plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallel-dkp",
        description="Train deep networks with DKP and related rules, layer-parallel across ranks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a network (run under torchrun for several ranks)",
        description="Train from a TOML config. Several ranks: torchrun --nproc-per-node N -m parallel_dkp train ...",
    )
    train.add_argument("--config", "-c", help="TOML file (see configs/); defaults apply without one")
    train.add_argument(
        "--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set rule.name=dfa --set run.epochs=3 (repeatable)",
    )
    resume = train.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", default=None,
        help="continue from the newest checkpoint in run.out_dir (an error if there is none); without "
             "this flag a run resumes anyway when run.out_dir holds a checkpoint of the same config",
    )
    resume.add_argument(
        "--no-resume", dest="resume", action="store_false",
        help="start over in run.out_dir, discarding its old checkpoints",
    )
    evaluation = sub.add_parser(
        "eval",
        help="test metrics of a saved model (any number of ranks, whatever partition trained it)",
        description="Loads the newest checkpoint in run.out_dir (or --checkpoint DIR) and evaluates it on "
                    "the test set. Prints the metrics; --out writes them as JSON.",
    )
    evaluation.add_argument("--config", "-c", help="TOML file of the run (its config.toml works)")
    evaluation.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    evaluation.add_argument("--checkpoint", help="a checkpoint folder (holding manifest.json); default: the newest")
    evaluation.add_argument("--out", help="write the metrics as JSON here")
    bench = sub.add_parser(
        "bench",
        help="time training steps of several rules side by side; --ranks: the unlocking benchmark",
        description="Without --ranks: interleaves one training step of each variant on the same batch in this "
                    "world (one process, or every rank under torchrun) and reports medians and ratios to the first. "
                    "With --ranks 1,2: launches its own gloo worlds on the CPU (one thread per rank unless "
                    "--threads-per-rank says otherwise), or under torchrun measures rank 0 alone and the whole "
                    "world, and reports dkp against bp on one device and through torch's GPipe/1F1B pipelines, "
                    "the unlocking speed-up, and the cost model's predictions and error.",
    )
    bench.add_argument("--config", "-c")
    bench.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    bench.add_argument("--rules", default="bp,dfa,dkp",
                       help="comma-separated variants, the first is the baseline; a chained rule may name its "
                            "pipeline schedule, e.g. bp@1f1b (default: bp,dfa,dkp; ignored with --ranks)")
    bench.add_argument("--alone", default="",
                       help="under torchrun, also step these rules on rank 0 alone between the world's steps (the "
                            "one-rank baseline, measured at the same moments), e.g. --alone dkp,bp")
    bench.add_argument("--ranks", help="the unlocking benchmark over these world sizes, e.g. 1,2 (1 is always added)")
    bench.add_argument("--microbatches", help="comma-separated micro-batch counts M (default: parallel.microbatches; "
                                              "4 with --ranks); the first gives the headline ratios")
    bench.add_argument("--replicas", default="1",
                       help="with --ranks, also measure each rank count as stages of these many data-parallel "
                            "replicas, each on a full batch (e.g. 2: stages x 2 replicas; worlds that need more "
                            "cores than this machine has are skipped and say so)")
    bench.add_argument("--threads-per-rank", type=int, default=1,
                       help="CPU threads of each rank in the worlds --ranks launches (default 1)")
    bench.add_argument("--rounds", type=int, default=2,
                       help="with --ranks, measure every world this many times in turn and pool (default 2)")
    bench.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    bench.add_argument("--out", help="write the full result (all samples, machine) as JSON here")
    bench.add_argument("--block-costs", action="store_true", help=argparse.SUPPRESS)  # a --ranks world's job
    bench.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    add_plan_subparser(sub)
    report_command.add_subparser(sub)
    trials_command.add_subparser(sub)
    return parser


def _bench(args, cfg, console: Console) -> None:
    from parallel_dkp import bench
    from parallel_dkp.parallel.distributed import distributed, resolve_device

    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps {args.steps} --warmup {args.warmup}: bench needs at least one timed step and no "
                         "negative warm-up; set e.g. --steps 20 --warmup 3")
    if args.threads_per_rank < 1 or args.rounds < 1:
        raise ValueError(f"--threads-per-rank {args.threads_per_rank} --rounds {args.rounds}: both must be >= 1")
    variants = [bench.Variant.parse(v) for v in args.rules.split(",") if v.strip()]
    if not variants:
        raise ValueError(f"--rules {args.rules!r} names no rule; give a comma-separated list, e.g. --rules bp,dfa,dkp "
                         "(the first is the baseline)")
    alone = [bench.Variant.parse(v) for v in args.alone.split(",") if v.strip()]
    if args.ranks and not args.microbatches:
        args.microbatches = "4"
    microbatches = bench.parse_list(args.microbatches, "--microbatches") if args.microbatches else None

    def config_for(extra=()) -> Config:
        # The same loader as train: per-rule sections and validation apply to every variant.
        return load_config(args.config, [*args.overrides, *extra])

    for v in variants:  # every variant's config is checked before any process group starts
        for m in microbatches or [cfg.parallel.microbatches]:
            config_for([*v.overrides, f"parallel.microbatches={m}"])

    if args.ranks and "WORLD_SIZE" not in os.environ and resolve_device(cfg.run).type == "cpu":
        # the CPU simulation: gloo worlds of each size, launched from here
        result = bench.run_unlocking(args, cfg, console)
        bench.print_unlocking(result, console)
        if args.out:
            bench.write_json(result, args.out)
        return
    with distributed(cfg.parallel, cfg.run) as ctx:
        if args.ranks:
            result = bench.run_unlocking_in_world(config_for, args, ctx, console)
        else:
            result = bench.measure_world(config_for, variants, ctx, microbatches=microbatches or
                                         [cfg.parallel.microbatches], steps=args.steps, warmup=args.warmup,
                                         block_costs=args.block_costs, link=True, alone=alone)
            result["machine"] = bench.machine(ctx)
        result["command"] = " ".join(sys.argv)
        if ctx.reports:
            if not args.quiet:
                (bench.print_unlocking if args.ranks else bench.print_world)(result, console)
            if args.out:
                bench.write_json(result, args.out)


def _owns_the_loss() -> bool:
    """The last rank reports (a plain process is its own last rank)."""
    return int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # soft_wrap: long lines (paths, the resume command) stay whole, so they can be copied
    console = Console(stderr=True, soft_wrap=True)
    if args.command == "report":  # reads saved files only: no config, no torch
        return report_command.run_report(args, console)
    try:
        cfg = load_config(args.config, args.overrides)
    except UnicodeDecodeError as err:  # a ValueError too: a binary or non-UTF-8 file given as --config
        console.print(
            f"[bold red]config error:[/] config file {escape(repr(args.config))} is not UTF-8 text (byte "
            f"{err.object[err.start]:#04x} at offset {err.start}); pass a TOML file such as configs/default.toml, "
            "or re-save this one as UTF-8"
        )
        return 2
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[bold red]config error:[/] {escape(str(err))}")
        return 2
    except OSError as err:  # PermissionError and the like, on the --config file
        if err.filename is None:
            raise
        console.print(
            f"[bold red]config error:[/] cannot read config file {escape(str(err.filename))} ({err.strerror}); "
            "fix its permissions, or pass another --config"
        )
        return 2
    if args.command == "plan":  # before the imports below: plan reads no data and starts nothing
        return run_plan(args, cfg, console)
    if args.command == "trials":  # runs train in subprocesses; imports no training code here
        return trials_command.run_trials(args, cfg, console)

    from parallel_dkp.guard import NonFiniteError
    from parallel_dkp.parallel.distributed import PeerFailure
    from parallel_dkp.train import RunInterrupted, evaluate_checkpoint, train

    try:
        if args.command == "train":
            train(cfg, console=console, resume=args.resume)
        elif args.command == "bench":
            _bench(args, cfg, console)
        elif args.command == "eval":
            result = evaluate_checkpoint(cfg, directory=args.checkpoint, console=console)
            if result is not None and args.out:
                Path(args.out).write_text(json.dumps(result, indent=2))
    except NonFiniteError as err:  # raised on every rank at once; the last one explains
        text = str(err) if _owns_the_loss() else "stopped with the other ranks (see the last rank's message)"
        console.print(f"[bold red]error:[/] rank {os.environ.get('RANK', '0')}: {escape(text)}")
        return 2
    except (ValueError, FloatingPointError) as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}")
        return 2
    except RunInterrupted as err:
        if _owns_the_loss():
            console.print(f"[bold yellow]{err.signal_name}:[/] {escape(str(err))}")
        return err.exit_code
    except PeerFailure as err:
        console.print(f"[bold red]peer failure:[/] {escape(str(err))}")
        return 3
    except OSError as err:
        # Our own FileNotFoundErrors (no dataset, no checkpoint) carry their message and no filename; a
        # file-system error on a path the user chose (run.out_dir, --out, data.root) names that path. An
        # OSError without a path (sockets, devices) is not the user's to fix here: it keeps its traceback.
        if not isinstance(err.filename, (str, bytes, os.PathLike)):
            if err.filename is not None or not isinstance(err, FileNotFoundError):
                raise
            console.print(f"[bold red]error:[/] {escape(str(err))}")
            return 2
        import errno

        filename = os.fsdecode(err.filename)
        path = Path(os.path.abspath(filename))
        out = getattr(args, "out", None)
        origins = [(f"--out {out}", Path(os.path.abspath(out))) if out else None,
                   (f"run.out_dir = {cfg.run.out_dir!r}", Path(os.path.abspath(cfg.run.out_dir))),
                   (f"data.root = {cfg.data.root!r}", Path(os.path.abspath(os.path.expanduser(cfg.data.root))))
                   if cfg.data.root else None]
        origin = next((name for name, root in filter(None, origins) if path == root or root in path.parents), None)
        hint = {
            PermissionError: "this user may not access it; fix its permissions, or choose a path you can use",
            FileExistsError: "a file is in the way of a folder of that name; move the file, or choose another path",
            NotADirectoryError: "a part of that path is a file, not a folder; choose a path made of folders",
            IsADirectoryError: "it is a folder, not a file; give a file path",
            FileNotFoundError: "its folder does not exist; create it, or choose another path",
        }.get(type(err), "check that path, or choose another one")
        if isinstance(err, FileNotFoundError) and path.parent.is_dir():
            hint = "it does not exist (deleted or moved while the run used it?); check that path"
        if err.errno == errno.ENOSPC:
            hint = "the disk is full; free some space, or choose a path on another disk"
        elif err.errno == errno.EROFS:
            hint = "that file system is read-only; choose a writable path"
        given = f" (from {origin})" if origin else ""
        console.print(f"[bold red]error:[/] {escape(filename)}{escape(given)}: {err.strerror}; {hint}")
        return 2
    except (MemoryError, RuntimeError) as err:  # only running out of memory; other RuntimeErrors are bugs
        import re

        import torch

        text = str(err)
        if isinstance(err, RuntimeError) and not (
            isinstance(err, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text
        ):
            raise
        size = re.search(r"allocate (\d+(?:\.\d+)?) ?(bytes|[KMGT]iB)", text)
        tried = ""
        if size:
            amount = f"{int(size.group(1)) / 2**30:.1f} GiB" if size.group(2) == "bytes" else " ".join(size.groups())
            tried = f" (tried to allocate {amount})"
        data = cfg.data
        smaller = [f"data.batch_size (now {data.batch_size})",
                   f"data.image_size (now {data.image_size or 'the native size'})"]
        if data.name == "synthetic":
            smaller += [f"data.synthetic_size (now {data.synthetic_size})",
                        f"data.synthetic_shape (now {list(data.synthetic_shape)})"]
        if cfg.model.name == "mlp":
            smaller.append(f"model.widths (now {list(cfg.model.widths)})")
        console.print(f"[bold red]out of memory[/] on rank {os.environ.get('RANK', '0')}{tried}: lower "
                      f"{', '.join(smaller)}, or run on a device with more memory")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
