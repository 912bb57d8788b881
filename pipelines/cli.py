"""``distillkit``: thin click commands over library functions.

Exit status: 0 success; 1 a build that rejected more than ``output.max_rejected`` of its
inputs, a failed ``verify``; 2 usage, manifest or dataset errors (one line, no traceback).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from distillkit.messages import one_line
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.registry import PluginError
from distillkit.pipelines.train_cli import SHARD_LOCATION, EvalGroup, TrainGroup
from distillkit.pipelines.train_cli import fail as _fail


def _version() -> str:
    from distillkit.build_info import build_info

    info = build_info()
    commit = f", commit {info['commit'][:12]}{' (dirty)' if info['dirty'] else ''}" if info["commit"] else ""
    return f"distillkit {info['version']}{commit}"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version())
        ctx.exit()


class DistillkitGroup(click.Group):
    """The ``distillkit`` group: bad data that any command may meet deep inside (an ``index.json`` that cannot
    be trusted, a shard field whose format would execute code) ends the command with one line and exit 2,
    whichever command met it (``train``'s data loader included), instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        from distillkit.pipelines.codecs import UnsafeFieldError
        from distillkit.pipelines.shards import BadIndex
        from distillkit.remote import RemoteError

        try:
            return super().invoke(ctx)
        except (BadIndex, UnsafeFieldError, RemoteError) as exc:  # RemoteError: a URL that failed for good
            _fail(one_line(exc))
            return None


@click.group(cls=DistillkitGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="print the version and commit, then exit")
def main() -> None:
    """Build, check and train on WebDataset shards for cross-modal self-distillation."""
    # Our loggers talk at INFO; dask's chatter (nannies closing, ...) stays at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("distillkit").setLevel(logging.INFO)


def synth_kinds() -> list[tuple[str, str, list[str]]]:
    """(name, one-line summary, sizes) of every registered synth kind, for ``synth --help``: the summary is
    the first sentence of the kind's module docstring, the sizes the keys of its module's ``SIZES``
    (empty when it has none). A kind that does not load is listed with the reason."""
    import importlib

    from distillkit.pipelines.registry import SYNTH

    kinds = []
    for name in SYNTH.names():
        try:
            module = importlib.import_module(getattr(SYNTH.get(name), "__module__", None) or "")
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is listed as such; --help must still work
            kinds.append((name, f"cannot be loaded: {exc}", []))
            continue
        doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        # "``distillkit synth audio OUT``: a folder tree ..." -> "a folder tree ..."
        doc = re.sub(r"^``[^`]*``:\s*", "", doc).replace("``", "")
        summary = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0]
        summary = summary[:1].upper() + summary[1:]
        sizes = getattr(module, "SIZES", {})
        kinds.append((name, summary, list(sizes) if isinstance(sizes, dict) else []))
    return kinds


class SynthCommand(click.Command):
    """``synth``, whose help lists the registered kinds (and their sizes) when it is shown."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, summary + (f" Sizes: {' | '.join(sizes)}." if sizes else ""))
                for name, summary, sizes in synth_kinds()]
        with formatter.section("Kinds"):
            formatter.write_dl(rows or [("(none)", "no synth kind is installed")])
        super().format_epilog(ctx, formatter)


@main.command(cls=SynthCommand)
@click.argument("kind")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, type=int)
@click.option("--size", default="small", help="how much data: the sizes KIND offers (listed below)")
def synth(kind: str, out: Path, seed: int, size: str) -> None:
    """Write synthetic data of KIND (one of the kinds below) in its native formats to OUT."""
    from distillkit.pipelines.registry import SYNTH

    try:
        make = SYNTH.get(kind)
        make(out, seed=seed, size=size)
    except PluginError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(f"synth {kind}: {exc}")
    click.echo(f"wrote synthetic {kind} ({size}, seed {seed}) to {out}")


@main.command(name="manifests")
def list_manifests() -> None:
    """List the packaged manifests with their descriptions (use a name with build or init)."""
    from distillkit.pipelines.catalog import packaged_manifests

    for name, path in packaged_manifests().items():
        lines = manifest_description(path) or [""]
        click.echo(f"{name:<24} {lines[0]}".rstrip())
        for line in lines[1:]:
            click.echo(f"{'':<24} {line}".rstrip())


def manifest_description(path: Path) -> list[str]:
    """The comment block at the top of a manifest, every line of it (usage examples keep their indent).

    Args:
        path: a manifest file.
    """
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        lines.append(text[1:] if text.startswith(" ") else text)
    return lines


@main.command()
@click.argument("name")
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="overwrite OUT if it exists")
def init(name: str, out: Path | None, force: bool) -> None:
    """Copy the packaged manifest NAME to OUT (default ./NAME.toml) to edit."""
    from distillkit.pipelines.catalog import init_manifest

    try:
        path = init_manifest(name, out, force=force)
    except ManifestError as exc:
        _fail(str(exc))
    click.echo(f"wrote {path}")


@main.command()
@click.argument("manifest")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a manifest key")
@click.option("--scheduler", default=None,
              help='"serial" (in-process), "" (embedded LocalCluster) or tcp://HOST:PORT of a dask scheduler')
@click.option("--workers", default=None, type=int, help="workers of the embedded LocalCluster")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--raise-errors", is_flag=True,
              help="stop at the first unexpected error with its traceback instead of rejecting the input")
@click.option("--print-job-script", is_flag=True,
              help='print the batch job script(s) of [cluster] kind = "slurm" / "pbs" and exit, submitting nothing')
def build(manifest: str, overrides: tuple[str, ...], scheduler: str | None, workers: int | None,
          quiet: bool, raise_errors: bool, print_job_script: bool) -> None:
    """Build the shards MANIFEST describes (a path or a packaged name; resumes a partial build)."""
    from distillkit.pipelines.catalog import load_manifest
    from distillkit.pipelines.executor import ClusterError
    from distillkit.pipelines.runner import BuildError
    from distillkit.pipelines.runner import build as run_build

    if print_job_script:
        _print_job_scripts(manifest, overrides)
        return
    try:
        m = load_manifest(manifest, list(overrides))
        if workers is not None and workers < 1:
            raise ManifestError(manifest, "--workers", "must be >= 1")
        result = run_build(m, scheduler=scheduler, workers=workers, progress=not quiet, raise_errors=raise_errors)
    except (ManifestError, ClusterError, BuildError) as exc:
        _fail(str(exc))
    except Exception as exc:  # a task failed outside any input (disk full, a bug): the build is unfinished
        if raise_errors:
            raise
        _fail(f"build did not finish: {one_line(exc, with_type=True)} "
              "(finished shards are kept; rerun to resume, --raise-errors for the traceback)", 3)
    click.echo(
        f"{result.written} samples from {result.planned} inputs in {result.built_shards + result.reused_shards} "
        f"shards ({result.reused_shards} reused), {len(result.rejected)} rejected: {result.index_path}"
    )
    for r in result.rejected[:20]:
        click.echo(f"  rejected [{r['stage']}] {r['source']}: {r['reason']}", err=True)
    if (too_many := result.over_limit(m.data["output"]["max_rejected"])) is not None:
        _fail(too_many, 1)


def _print_job_scripts(manifest: str, overrides: tuple[str, ...]) -> None:
    """``build --print-job-script``: the job scripts ``[cluster]`` would submit (pipelines.jobqueue.job_scripts)."""
    from distillkit.pipelines.catalog import load_manifest
    from distillkit.pipelines.jobqueue import JobQueueError, is_job_queue, job_scripts, refuse_idle_gpu_jobs
    from distillkit.pipelines.registry import get_pipeline

    try:
        m = load_manifest(manifest, list(overrides))
        cluster = m.data["cluster"]
        if not is_job_queue(cluster):
            raise ManifestError(m.path, "cluster.kind", '"local" submits no job: set "slurm" or "pbs"')
        refuse_idle_gpu_jobs(m.path, m.pipeline, cluster, get_pipeline(m.pipeline).torch_stages(m))
        scripts = job_scripts(cluster)
    except (ManifestError, JobQueueError) as exc:
        _fail(str(exc))
    for what, count, script in scripts:
        if len(scripts) > 1:
            click.echo(f"# ---- {what} script (submitted {count} time(s)) ----")
        click.echo(script.rstrip("\n"))


@main.command()
@click.argument("shard_dir", type=SHARD_LOCATION)
def verify(shard_dir: Path | str) -> None:
    """Re-hash every shard, check every sample's schema, recompute index.json's counts and statistics from the
    shard records, and flag files no build left there (temporary files of killed writers are faults). SHARD_DIR
    may be a URL (s3://bucket/prefix, https://host/path/, file:///dir): each shard is streamed and hashed once."""
    from distillkit.pipelines.inspect import verify as run_verify
    from distillkit.pipelines.shards import BadIndex

    try:
        report = run_verify(shard_dir, progress=sys.stderr.isatty())
    except (FileNotFoundError, KeyError, PluginError, BadIndex) as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    for problem in report.problems:
        click.echo(f"FAULT {problem}")
    for warning in report.warnings:
        click.echo(f"WARNING {warning}")
    for unchecked in report.unchecked:
        click.echo(f"NOT CHECKED {unchecked}")
    warned = f", {len(report.warnings)} warnings" if report.warnings else ""
    click.echo(f"{report.shards} shards, {report.samples} samples, {len(report.problems)} faults{warned}")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("shard_dir", type=SHARD_LOCATION)
def stats(shard_dir: Path | str) -> None:
    """Counts, sizes, rejected inputs and dataset statistics of a shard directory."""
    from distillkit.pipelines.inspect import stats_text
    from distillkit.pipelines.shards import BadIndex

    try:
        click.echo(stats_text(shard_dir))
    except (FileNotFoundError, BadIndex) as exc:
        _fail(str(exc))


@main.command()
@click.argument("shard_dir", type=SHARD_LOCATION)
@click.option("--key", default=None,
              help="sample key (default: the first sample; audio: the first that is mostly signal)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write")
def show(shard_dir: Path | str, key: str | None, out: Path) -> None:
    """Render one sample as a picture."""
    from distillkit.pipelines.inspect import ShowError
    from distillkit.pipelines.inspect import show as run_show
    from distillkit.pipelines.shards import BadIndex

    try:
        k = run_show(shard_dir, out, key)
    except (PluginError, BadIndex, ShowError) as exc:
        _fail(str(exc))
    except (FileNotFoundError, KeyError) as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    click.echo(f"{k} -> {out}")


main.add_command(TrainGroup(name="train", help="Train METHOD on a shard directory (distillkit train METHOD --help)."))


main.add_command(EvalGroup(name="eval", help="Evaluate METHOD's checkpoint against random init "
                                          "(distillkit eval METHOD --help)."))


@main.command()
@click.option("--out", default=Path("demo-out"), type=click.Path(path_type=Path))
@click.option("--steps", default=None, type=int, help="training steps per method [default: each method's demo setting]")
@click.option("--seed", default=0, type=int, show_default=True, help="seeds the synthetic data and the training")
@click.option("--only", "only", multiple=True, help="run only these pipelines (default: every one with a demo)")
def demo(out: Path, steps: int | None, seed: int, only: tuple[str, ...]) -> None:
    """Synthetic data -> shards on an embedded dask cluster -> verify -> picture -> train -> evaluate."""
    from distillkit.pipelines.demo import run_demo

    try:
        run_demo(out, steps=steps, only=list(only) or None, seed=seed)
    except PluginError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
