"""How distillkit is packaged: one installed namespace, wheels that carry their commit.

* every folder mapped in ``pyproject.toml`` installs each of its subpackages (none forgotten);
* a user's own ``train.py`` / ``pipelines/`` beside their script neither shadows distillkit nor is
  shadowed by it, in the library and through the ``distillkit`` command;
* ``distillkit.build_info`` asks git only in the checkout itself, and otherwise reads the commit
  stamped into the package at build time, never git of some unrelated enclosing repository;
* (slow) the sdist and wheel that ``python -m build`` makes hold exactly ``distillkit/``, the
  packaged manifests, the stamped commit and the entry points, and the wheel installed into a
  fresh virtual environment runs the SLidR demo from an empty directory, recording its commit, imports
  every pipeline with its dependencies and writes every synthetic source.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The top-level names the repository's folders would have had, had they been installed as they lie.
FOLDER_NAMES = ("pipelines", "sensors", "preprocess", "train", "manifests")


def tail(text: str | bytes | None, n: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; on a non-zero exit (or a timeout) fail with the tails of its stdout and stderr."""
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{cmd} timed out after {timeout}s\n--- stdout\n{tail(e.stdout)}\n--- stderr\n{tail(e.stderr)}")
    assert proc.returncode == 0, (f"{cmd} exited {proc.returncode} in {cwd}\n--- stdout\n{tail(proc.stdout)}"
                                  f"\n--- stderr\n{tail(proc.stderr)}")
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    # Nothing of this checkout or this venv may leak into the child: PYTHONPATH would put the
    # repository's folders on sys.path and hide exactly the shadowing this file looks for.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def git_head(root: Path) -> str | None:
    """HEAD of the git work tree whose top level is ``root``, or None (an unpacked sdist, no git)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        if Path(top).resolve() != root.resolve():
            return None
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# --- the package list -------------------------------------------------------------------------


def test_every_subpackage_is_listed():
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools_cfg["package-dir"]
    listed = set(setuptools_cfg["packages"])

    # Every folder with an __init__.py under a mapped folder is a package setuptools must be told
    # about: with an explicit list a forgotten one is silently left out of the wheel (the editable
    # install finds it anyway, so only an installed wheel would break).
    found = {}
    for name, folder in package_dir.items():
        base = ROOT / folder
        assert (base / "__init__.py").is_file(), f"package-dir maps {name} to {folder}, which is no package"
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found[".".join((name, *rel.parts))] = init.parent
    missing = sorted(set(found) - listed)
    assert not missing, f"packages with an __init__.py that [tool.setuptools] packages leaves out: {missing}"

    # ...and every listed package must exist where package-dir says (longest mapped prefix wins,
    # as in setuptools), or setuptools fails (or ships an empty namespace) only at build time.
    for name in sorted(listed):
        prefix = max((p for p in package_dir if name == p or name.startswith(p + ".")), key=len, default=None)
        assert prefix is not None, f"{name} lies under no package-dir mapping"
        where = ROOT / package_dir[prefix] / Path(*name[len(prefix):].split(".")[1:])
        assert (where / "__init__.py").is_file(), f"listed package {name} has no {where / '__init__.py'}"

    # The folders themselves only ever install under distillkit.*.
    assert all(n == "distillkit" or n.startswith("distillkit.") for n in listed), listed

    # Non-Python files in a package (manifests, py.typed) reach the wheel only through package-data.
    package_data: dict[str, list[str]] = setuptools_cfg.get("package-data", {})
    generated = {ROOT / "distillkit" / "_build_commit.json"}  # written into the wheel by setup.py
    unshipped = []
    for name, where in found.items():
        for f in where.iterdir():
            if f.is_file() and f.suffix not in (".py", ".pyc") and f not in generated:
                if not any(fnmatch.fnmatch(f.name, pat) for pat in package_data.get(name, [])):
                    unshipped.append(str(f.relative_to(ROOT)))
    assert not unshipped, f"files no [tool.setuptools.package-data] pattern ships: {unshipped}"


# --- shadowing --------------------------------------------------------------------------------


def test_user_modules_do_not_shadow_distillkit(tmp_path):
    # A user's project with modules named like our folders: had distillkit installed them as
    # top-level `train` / `pipelines`, either theirs would hide ours (distillkit's own imports
    # break) or ours would hide theirs. Run from that directory, which python -c puts first on
    # sys.path (''), exactly as for a user's `python script.py`.
    (tmp_path / "train.py").write_text("USER_TRAIN = 1\n")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("USER_PIPELINES = 1\n")
    code = "\n".join([
        "import sys, importlib.util",
        "assert sys.path[0] in ('', '.'), sys.path[:3]",
        "import train, pipelines, distillkit.train.streaming, distillkit.pipelines.runner",
        "assert train.USER_TRAIN == 1 and pipelines.USER_PIPELINES == 1",
        "import distillkit",
        f"root = {str(tmp_path.resolve())!r}",
        # distillkit's modules come from distillkit, not from the user's folder...
        "for m in (distillkit.train.streaming, distillkit.pipelines.runner):",
        "    assert not m.__file__.startswith(root), m.__file__",
        "assert distillkit.train.__name__ == 'distillkit.train' and distillkit.train is not train",
        # ...and distillkit puts no top-level folder names of its own on sys.path.
        f"stray = [n for n in {FOLDER_NAMES!r} if n not in ('train', 'pipelines') and importlib.util.find_spec(n)]",
        "assert not stray, stray",
        "print('ok')",
    ])
    proc = run([sys.executable, "-c", code], cwd=tmp_path, timeout=120, env=clean_env())
    assert proc.stdout.strip().endswith("ok")

    # The installed command too. A console script has its bin/ first on sys.path, not the cwd,
    # so put the user's folder on PYTHONPATH, as a user with their project on the path has it.
    cli = Path(sys.executable).parent / "distillkit"
    assert cli.is_file(), f"no installed distillkit command next to {sys.executable}"
    env = clean_env(PYTHONPATH=str(tmp_path))
    version = run([cli, "--version"], cwd=tmp_path, timeout=120, env=env)
    assert version.stdout.startswith("distillkit "), version.stdout
    manifests = run([cli, "manifests"], cwd=tmp_path, timeout=120, env=env)
    assert "demo-slidr" in manifests.stdout and "slidr-nuscenes" in manifests.stdout, manifests.stdout


# --- build_info -------------------------------------------------------------------------------


def test_build_info_in_checkout_is_head():
    from distillkit import build_info as bi

    head = git_head(ROOT)
    if head is None:
        pytest.skip("not a git checkout (an unpacked sdist?)")
    bi.build_info.cache_clear()  # HEAD may have moved since another test asked
    info = bi.build_info()
    assert info["commit"] == head
    assert isinstance(info["dirty"], bool)
    assert info["version"] == PYPROJECT["project"]["version"]


def _git(cwd: Path, *args: str) -> str:
    env = clean_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return run(["git", *args], cwd=cwd, timeout=60, env=env).stdout.strip()


@pytest.mark.parametrize("layout", ["site-packages", "unpacked-sdist", "target-at-repo-top"])
def test_build_info_reads_stamp_not_enclosing_repo(tmp_path, layout):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    # An unrelated repository that happens to enclose the installed package (a venv inside a
    # project, a wheel unpacked in a work tree). Its commit must never be reported as ours.
    outer = tmp_path / "someone-elses-repo"
    outer.mkdir()
    _git(outer, "init", "-q")
    (outer / "README").write_text("not distillkit\n")
    _git(outer, "add", "README")
    _git(outer, "commit", "-q", "-m", "unrelated")
    outer_head = _git(outer, "rev-parse", "HEAD")

    # site-packages: distillkit's parent has no pyproject.toml and lies deep in the work tree.
    # unpacked-sdist: it has one (a source tree), but is not the top of the enclosing work tree.
    # target-at-repo-top (`pip install --target .` in a repository): the parent IS the work tree's
    # top, but no distillkit source tree (no pyproject.toml), so its git history is not ours.
    parent = {"site-packages": outer / "lib/python3/site-packages", "unpacked-sdist": outer / "distillkit-0.1.0",
              "target-at-repo-top": outer}[layout]
    pkg = parent / "distillkit"
    pkg.mkdir(parents=True)
    if layout == "unpacked-sdist":
        (parent / "pyproject.toml").write_text("[project]\nname = 'distillkit'\n")
    shutil.copy(ROOT / "distillkit" / "build_info.py", pkg / "build_info.py")
    stamped = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True}
    (pkg / "_build_commit.json").write_text(json.dumps(stamped))

    spec = importlib.util.spec_from_file_location(f"copied_build_info_{layout.replace('-', '_')}",
                                                  pkg / "build_info.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    info = module.build_info()
    assert info["commit"] != outer_head, "build_info reported the enclosing repository's commit"
    assert (info["commit"], info["dirty"]) == (stamped["commit"], stamped["dirty"])

    # Without a stamp it admits not knowing rather than borrowing the enclosing repository's commit.
    (pkg / "_build_commit.json").unlink()
    module.build_info.cache_clear()
    info = module.build_info()
    assert (info["commit"], info["dirty"]) == (None, None)


# --- the wheel, installed -----------------------------------------------------------------------


def _base_python() -> str:
    # The interpreter this venv was made from, as a user's `python3 -m venv` would use it.
    base = getattr(sys, "_base_executable", None)
    if base and Path(base).is_file():
        return base
    found = shutil.which("python3")
    assert found, "no base python3 to make a fresh venv with"
    return found


@pytest.mark.slow
def test_wheel_in_fresh_venv_runs_demo(tmp_path):
    timings: dict[str, float] = {}

    def timed(label, *args, **kwargs):
        t0 = time.monotonic()
        proc = run(*args, **kwargs)
        timings[label] = round(time.monotonic() - t0, 1)
        return proc

    head_before = git_head(ROOT)
    dist = tmp_path / "dist"
    # sdist first, then the wheel built from the unpacked sdist (build's default), so the wheel's
    # stamp must survive the trip through an sdist that has no .git.
    timed("build", [sys.executable, "-m", "build", "--outdir", dist, ROOT], cwd=ROOT, timeout=300, env=clean_env())
    # A commit may land while the build runs: the stamp must name HEAD as of before or after it.
    heads = {head_before, git_head(ROOT)} - {None}
    wheels = list(dist.glob("distillkit-*.whl"))
    sdists = list(dist.glob("distillkit-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    wheel = wheels[0]

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/", 1)[0] for n in names}
        dist_info = [t for t in top if t.endswith(".dist-info")]
        # Only the one namespace: a stray top-level `train/` or `pipelines/` would shadow (or be
        # shadowed by) a user's own modules of those names.
        assert len(dist_info) == 1 and top == {"distillkit", dist_info[0]}, sorted(top)
        packaged = {n.rsplit("/", 1)[1] for n in names if n.startswith("distillkit/manifests/") and n.endswith(".toml")}
        assert {"demo-slidr.toml", "slidr-nuscenes.toml"} <= packaged, packaged
        assert packaged == {p.name for p in (ROOT / "manifests").glob("*.toml")}, packaged
        wheel_stamp = json.loads(zf.read("distillkit/_build_commit.json"))
        entry_points = configparser.ConfigParser(delimiters=("=",))
        entry_points.optionxform = str  # entry-point names are case-sensitive
        entry_points.read_string(zf.read(f"{dist_info[0]}/entry_points.txt").decode())

    # Every plug-in group and the command, exactly as pyproject.toml declares them.
    declared = {**PYPROJECT["project"]["entry-points"], "console_scripts": PYPROJECT["project"]["scripts"]}
    assert {"distillkit.pipelines", "distillkit.trainers", "distillkit.synth"} <= set(declared)
    for group, entries in declared.items():
        assert entry_points.has_section(group), f"{group} missing from entry_points.txt"
        assert dict(entry_points[group]) == entries, (group, dict(entry_points[group]))

    assert set(wheel_stamp) == {"commit", "dirty"}, wheel_stamp
    head = None
    if heads:
        assert wheel_stamp["commit"] in heads, (wheel_stamp, heads)
        assert isinstance(wheel_stamp["dirty"], bool)
        head = wheel_stamp["commit"]

    with tarfile.open(sdists[0]) as tf:
        prefix = tf.getnames()[0].split("/", 1)[0] + "/"
        in_sdist = {n[len(prefix):] for n in tf.getnames() if n.startswith(prefix)}
        sdist_stamp = json.loads(tf.extractfile(prefix + "distillkit/_build_commit.json").read())
    assert sdist_stamp == wheel_stamp
    if head is not None:
        # The sdist is the project bar repository plumbing (dotfiles): without MANIFEST.in setuptools
        # ships tests/test_*.py but not conftest.py, docs/ or bench/ that the tests read, so the
        # unpacked sdist's test suite cannot run.
        tracked = run(["git", "ls-files"], cwd=ROOT, timeout=60).stdout.splitlines()
        expected = {f for f in tracked if not f.startswith(".") and (ROOT / f).is_file()}
        missing = sorted(expected - in_sdist)
        assert not missing, f"tracked files the sdist leaves out: {missing}"

    # A fresh venv (not --system-site-packages: it must install everything it needs itself). The CPU
    # torch that lies on local disk goes in first, so resolving the wheel never pulls a CUDA build.
    # --no-compile: byte-compiling torch and friends is half the install time and tests nothing.
    venv = tmp_path / "venv"
    timed("venv", [_base_python(), "-m", "venv", venv], cwd=tmp_path, timeout=180, env=clean_env())
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    timed("pip torch", [*pip, "torch==2.13.0"], cwd=tmp_path, timeout=600, env=clean_env())
    timed("pip wheel", [*pip, wheel], cwd=tmp_path, timeout=600, env=clean_env())

    # Everything from an empty directory: no checkout, no manifests, no repository folders around.
    empty = tmp_path / "empty"
    empty.mkdir()
    env = clean_env()
    cli = venv / "bin" / "distillkit"
    version = timed("--version", [cli, "--version"], cwd=empty, timeout=120, env=env).stdout.strip()
    if head is not None:
        dirty = " (dirty)" if wheel_stamp["dirty"] else ""
        assert version == f"distillkit {PYPROJECT['project']['version']}, commit {head[:12]}{dirty}", version
    manifests = timed("manifests", [cli, "manifests"], cwd=empty, timeout=120, env=env).stdout
    assert "demo-slidr" in manifests and "slidr-nuscenes" in manifests, manifests
    stray = run([venv / "bin" / "python", "-c", "import importlib.util as u; "
                 f"print([n for n in {FOLDER_NAMES!r} if u.find_spec(n)])"], cwd=empty, timeout=120, env=env)
    assert stray.stdout.strip() == "[]", f"the wheel installed top-level modules: {stray.stdout}"

    # The whole demo of one pipeline (tests/test_demo.py runs every pipeline's in-process); for the others,
    # what the wheel must bring: their packaged manifests, their modules and dependencies (PyAV, soundfile,
    # librosa, OpenCV) importable, and their synthetic sources written in the native formats.
    timed("demo", [cli, "demo", "--out", "demo", "--steps", "2", "--only", "slidr"], cwd=empty, timeout=600,
          env=env)
    for name in ("demo-comodo", "comodo-ego4d", "demo-audio", "audio-dir", "demo-uniseg", "uniseg-images"):
        assert name in manifests, (name, manifests)
    imports = ("import distillkit.pipelines.comodo, distillkit.pipelines.audio, distillkit.pipelines.uniseg, "
               "distillkit.train.comodo, distillkit.train.audio, distillkit.train.uniseg, av, soundfile, librosa")
    run([venv / "bin" / "python", "-c", imports], cwd=empty, timeout=120, env=env)
    for kind in ("ego", "audio", "images"):
        timed(f"synth {kind}", [cli, "synth", kind, f"synth-{kind}"], cwd=empty, timeout=300, env=env)
        assert any((empty / f"synth-{kind}").rglob("*.*")), kind
    index = json.loads((empty / "demo" / "shards" / "slidr" / "index.json").read_text())
    assert index["package_version"] == "0.1.0"
    # The installed wheel has no checkout: the commit comes from the stamp written at build time.
    assert index["git"] == wheel_stamp, index["git"]
    if head is not None:
        assert index["git"]["commit"] == head
    assert (empty / "demo" / "slidr-sample.png").is_file()
    assert (empty / "demo" / "runs" / "slidr" / "latest.pt").is_file()

    timed("init", [cli, "init", "demo-slidr"], cwd=empty, timeout=120, env=env)
    written = empty / "demo-slidr.toml"
    assert written.is_file()
    assert tomllib.loads(written.read_text()) == tomllib.loads((ROOT / "manifests" / "demo-slidr.toml").read_text())
    print("timings (s):", timings)
    shutil.rmtree(venv)  # 1.7 GB; pytest keeps the last few tmp dirs (a failed run keeps its venv to look at)
