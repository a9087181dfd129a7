"""Print pip requirement lines from pyproject.toml, for the Docker builds.

``python docker/torch_requirements.py`` prints the torch and torchvision ranges that
``pyproject.toml`` declares, so an online image build can install exactly those ranges from the
PyTorch CPU index (Dockerfile.cpu) or PyPI (Dockerfile.cuda) before ``pip install .``.
``python docker/torch_requirements.py --all`` prints every runtime dependency (markers kept), which
``docker/build.sh`` downloads into the wheelhouse for an offline build.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PACKAGES = ("torch", "torchvision")


def _name(requirement: str) -> str:
    return re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1).lower()


def dependencies(pyproject: Path) -> list[str]:
    """Every line of ``[project].dependencies``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (build.sh runs this on the host)
        import tomli as tomllib

    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def declared(pyproject: Path) -> list[str]:
    """The dependency lines of ``pyproject`` that name torch or torchvision."""
    lines = [d for d in dependencies(pyproject) if _name(d) in PACKAGES]
    missing = set(PACKAGES) - {_name(d) for d in lines}
    if missing:
        raise SystemExit(f"{pyproject}: no dependency on {', '.join(sorted(missing))}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every runtime dependency, not only torch/torchvision")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    if args.all:
        declared(args.pyproject)  # the same check: torch and torchvision must be there
        print("\n".join(dependencies(args.pyproject)))
    else:
        print("\n".join(declared(args.pyproject)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
