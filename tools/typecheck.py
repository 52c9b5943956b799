"""Type-check the project with mypy under its installed names.

The repository maps root folders onto one namespace (`engine/` is `alignedserve.engine`,
pyproject's package-dir), which mypy cannot follow from the source tree. This builds a
tree of symlinks that has the installed layout (build/typecheck/alignedserve/...) and runs
mypy there on the packages listed in pyproject's [tool.alignedserve] typecheck list.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def build_tree() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = cfg["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    for name, folder in sorted(mapping.items()):
        if name == "alignedserve":  # the API package holds files, not sub-folders
            dest = TREE / "alignedserve"
            dest.mkdir(parents=True)
            for f in (ROOT / folder).glob("*.py"):
                (dest / f.name).symlink_to(f)
            continue
        dest = TREE.joinpath(*name.split("."))
        if not dest.exists():  # sub-packages come with their parent's link
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(ROOT / folder, target_is_directory=True)


def main() -> int:
    build_tree()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = cfg["tool"]["alignedserve"]["typecheck"]
    args = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
    for pkg in packages:
        args += ["-p", pkg]
    return subprocess.call(args, cwd=TREE)


if __name__ == "__main__":
    sys.exit(main())
