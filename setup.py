"""Only to stamp the git commit into wheels and sdists (everything else is in pyproject.toml).

``distillkit/_build_commit.json`` records the commit and dirty flag of the checkout a wheel was
built from, so an installed distillkit writes its commit into ``index.json`` without a checkout.
A wheel built from an sdist (``python -m build``) copies the file the sdist carries.
"""

import json
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
COMMIT_FILE = Path("distillkit") / "_build_commit.json"


def commit_info() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == HERE:
            return {"commit": git("rev-parse", "HEAD"),
                    "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        pass
    carried = HERE / COMMIT_FILE  # present in an sdist
    return json.loads(carried.read_text()) if carried.is_file() else {"commit": None, "dirty": None}


class BuildPy(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / COMMIT_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(commit_info()) + "\n")


class SDist(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / COMMIT_FILE
        if target.exists():
            target.unlink()  # a hard link into the source tree: never write through it
        target.write_text(json.dumps(commit_info()) + "\n")


setup(cmdclass={"build_py": BuildPy, "sdist": SDist})
