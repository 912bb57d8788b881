"""Which distillkit built a shard directory: version, git commit and dirty flag.

In a git checkout (an editable install, the tests) git is asked. A wheel has no checkout: its
commit was written into ``distillkit/_build_commit.json`` when the wheel was built (see
``setup.py``), so ``index.json`` of an installed distillkit still names the commit. Never
``git`` of whatever repository happens to enclose site-packages.
"""

from __future__ import annotations

import json
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
COMMIT_FILE = "_build_commit.json"


def version() -> str:
    """The installed distribution's version ("0+unknown" for a never-installed source tree)."""
    try:
        return metadata.version("distillkit")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def git_commit(root: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git work tree whose top level is exactly ``root``, or None."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return None


@lru_cache(maxsize=1)
def build_info() -> dict[str, Any]:
    """``{"version", "commit", "dirty"}``; commit and dirty are None when unknown."""
    root = PACKAGE_DIR.parent
    found = git_commit(root) if (root / "pyproject.toml").is_file() else None
    if found is None and (PACKAGE_DIR / COMMIT_FILE).is_file():
        try:
            found = json.loads((PACKAGE_DIR / COMMIT_FILE).read_text())
        except ValueError:
            found = None
    found = found or {"commit": None, "dirty": None}
    return {"version": version(), "commit": found.get("commit"), "dirty": found.get("dirty")}
