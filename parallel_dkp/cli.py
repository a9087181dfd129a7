"""``parallel-dkp`` command line: ``train`` (``eval``, ``bench`` and ``report`` come next)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from parallel_dkp.config import load_config


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[bold red]config error:[/] {escape(str(err))}")
        return 2
    if args.command == "train":
        from parallel_dkp.parallel.distributed import PeerFailure
        from parallel_dkp.train import train

        try:
            train(cfg, console=console)
        except (ValueError, FileNotFoundError, FloatingPointError) as err:
            console.print(f"[bold red]error:[/] {escape(str(err))}")
            return 2
        except PeerFailure as err:
            console.print(f"[bold red]peer failure:[/] {escape(str(err))}")
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
