"""``distillkit``: thin click commands over library functions.

Exit status: 0 success; 1 a build that rejected more than ``output.max_rejected`` of its
inputs, a failed ``verify``; 2 usage, manifest or dataset errors (one line, no traceback).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pipelines.manifest import ManifestError


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Build, check and train on WebDataset shards for cross-modal self-distillation."""
    # Our loggers talk at INFO; dask's chatter (nannies closing, ...) stays at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("pipelines", "sensors", "preprocess", "train"):
        logging.getLogger(name).setLevel(logging.INFO)


@main.command()
@click.argument("kind", type=click.Choice(["nuscenes"]))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, type=int)
@click.option("--size", default="small", type=click.Choice(["small", "medium"]))
def synth(kind: str, out: Path, seed: int, size: str) -> None:
    """Write synthetic data in its native format (nuScenes tables, .pcd.bin, JPEGs)."""
    from sensors.synth_nuscenes import make_nuscenes

    make_nuscenes(out, seed=seed, size=size)
    click.echo(f"wrote synthetic {kind} ({size}, seed {seed}) to {out}")


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a manifest key")
@click.option("--scheduler", default=None, help="tcp://HOST:PORT of an existing dask scheduler")
@click.option("--workers", default=None, type=int, help="workers of the embedded LocalCluster")
@click.option("--quiet", is_flag=True, help="no progress bar")
def build(manifest: Path, overrides: tuple[str, ...], scheduler: str | None, workers: int | None,
          quiet: bool) -> None:
    """Build the shards a manifest describes (resumes a partial build)."""
    from pipelines.executor import ClusterError
    from pipelines.manifest import load_manifest
    from pipelines.runner import build as run_build

    try:
        m = load_manifest(manifest, list(overrides))
        if workers is not None and workers < 1:
            raise ManifestError(manifest, "--workers", "must be >= 1")
        result = run_build(m, scheduler=scheduler, workers=workers, progress=not quiet)
    except ManifestError as exc:
        _fail(str(exc))
    except ClusterError as exc:
        _fail(str(exc))
    click.echo(
        f"{result.written} samples in {result.built_shards + result.reused_shards} shards "
        f"({result.reused_shards} reused), {len(result.rejected)} rejected of {result.planned}: "
        f"{result.index_path}"
    )
    for r in result.rejected[:20]:
        click.echo(f"  rejected [{r['stage']}] {r['source']}: {r['reason']}", err=True)
    limit = m.data["output"]["max_rejected"]
    if result.rejected_fraction > limit:
        _fail(f"rejected {result.rejected_fraction:.1%} of inputs, above output.max_rejected={limit:.1%}", 1)


@main.command()
@click.argument("shard_dir", type=click.Path(path_type=Path))
def verify(shard_dir: Path) -> None:
    """Re-hash every shard and check every sample's schema."""
    from pipelines.inspect import verify as run_verify

    try:
        report = run_verify(shard_dir, progress=sys.stderr.isatty())
    except (FileNotFoundError, KeyError) as exc:
        _fail(str(exc))
    for problem in report.problems:
        click.echo(f"FAULT {problem}")
    click.echo(f"{report.shards} shards, {report.samples} samples, {len(report.problems)} faults")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("shard_dir", type=click.Path(path_type=Path))
def stats(shard_dir: Path) -> None:
    """Counts, sizes, rejected inputs and dataset statistics of a shard directory."""
    from pipelines.inspect import stats_text

    try:
        click.echo(stats_text(shard_dir))
    except FileNotFoundError as exc:
        _fail(str(exc))


@main.command()
@click.argument("shard_dir", type=click.Path(path_type=Path))
@click.option("--key", default=None, help="sample key (default: the first sample)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write")
def show(shard_dir: Path, key: str | None, out: Path) -> None:
    """Render one sample as a picture."""
    from pipelines.inspect import show as run_show

    try:
        k = run_show(shard_dir, out, key)
    except (FileNotFoundError, KeyError) as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
    click.echo(f"{k} -> {out}")


def _trainer(method: str):
    from train.registry import TRAINERS

    if method not in TRAINERS:
        _fail(f"unknown method {method!r} (known: {', '.join(sorted(TRAINERS))})")
    return TRAINERS[method]


@main.command()
@click.argument("method")
@click.option("--shards", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--max-steps", default=100, type=int)
@click.option("--out", default=Path("runs/train"), type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="continue from the last checkpoint in --out")
@click.option("--strict", is_flag=True, help="stop at the first bad sample instead of skipping it")
@click.option("--size", default="small", type=click.Choice(["small", "paper"]), help="network sizes")
@click.option("--batch-size", default=2, type=int)
@click.option("--num-workers", default=0, type=int)
@click.option("--seed", default=0, type=int)
@click.option("--teacher-checkpoint", default=None, type=click.Path(path_type=Path, exists=True))
def train(method: str, shards: Path, device: str, max_steps: int, out: Path, resume: bool, strict: bool,
          size: str, batch_size: int, num_workers: int, seed: int, teacher_checkpoint: Path | None) -> None:
    """Train METHOD on a shard directory."""
    trainer = _trainer(method)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda but no CUDA device is available")
    metrics = trainer.train_main(shards=shards, out=out, device=device, max_steps=max_steps, resume=resume,
                                 strict=strict, size=size, seed=seed, batch_size=batch_size,
                                 num_workers=num_workers, teacher_checkpoint=teacher_checkpoint)
    from train.loop import format_metrics

    click.echo(format_metrics(metrics))


@main.command(name="eval")
@click.argument("method")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--shards", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--device", default="cpu", type=click.Choice(["cpu", "cuda"]))
@click.option("--size", default="small", type=click.Choice(["small", "paper"]))
@click.option("--seed", default=0, type=int)
def evaluate(method: str, checkpoint: Path, shards: Path, device: str, size: str, seed: int) -> None:
    """Linear probe: distilled features against the same network at random init."""
    from train.probe import format_probe

    trainer = _trainer(method)
    result = trainer.eval_main(checkpoint=checkpoint, shards=shards, device=device, size=size, seed=seed)
    click.echo(format_probe(result))


@main.command()
@click.option("--out", default=Path("demo-out"), type=click.Path(path_type=Path))
@click.option("--steps", default=120, type=int, help="training steps per method")
def demo(out: Path, steps: int) -> None:
    """Synthetic data -> shards on an embedded dask cluster -> verify -> picture -> train."""
    from pipelines.demo import run_demo

    run_demo(out, steps=steps)


if __name__ == "__main__":
    main()
