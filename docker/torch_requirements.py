"""Print pip requirement lines for torch and torchvision, for the Docker builds.

``python docker/torch_requirements.py`` prints the ranges that ``pyproject.toml`` declares, so the
CPU image can install the CPU wheels of exactly those ranges before ``pip install .``.
``python docker/torch_requirements.py --installed`` prints ``name==version`` of the copies already
installed, as a pip constraints file, so ``pip install .`` in the CUDA image keeps the base
image's CUDA build instead of swapping in another one.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision")


def _name(requirement: str) -> str:
    return re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1).lower()


def declared(pyproject: Path) -> list[str]:
    """The dependency lines of ``pyproject`` that name torch or torchvision."""
    import tomllib  # here, not at the top: --installed must also run on Python 3.10

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    lines = [d for d in deps if _name(d) in PACKAGES]
    missing = set(PACKAGES) - {_name(d) for d in lines}
    if missing:
        raise SystemExit(f"{pyproject}: no dependency on {', '.join(sorted(missing))}")
    return lines


def installed() -> list[str]:
    """``name==version`` for each of torch/torchvision that is installed."""
    pins = []
    for name in PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    if not pins:
        raise SystemExit("torch is not installed in this interpreter; nothing to pin")
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--installed", action="store_true", help="pin the installed versions instead")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    print("\n".join(installed() if args.installed else declared(args.pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
