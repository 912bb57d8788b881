"""``distillkit demo``: every stage of the toolkit on synthetic data, end to end, for every
registered pipeline that declares a ``Demo`` (and the trainers that read its shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from distillkit.pipelines.base import Pipeline
from distillkit.pipelines.manifest import Manifest


def demo_manifest(pipeline: Pipeline, data: Path, shards: Path, *extra: str) -> Manifest:
    """The pipeline's packaged demo manifest pointed at ``data`` (its synthetic source) and
    writing to ``shards``. Shared by the demo and the conformance tests."""
    from distillkit.pipelines.catalog import load_manifest

    if pipeline.demo is None:
        raise ValueError(f"pipeline {pipeline.name!r} declares no demo")
    return load_manifest(pipeline.demo.manifest, [f"{pipeline.source_key}={data}", f"output.dir={shards}", *extra])


def make_demo_data(pipeline: Pipeline, root: Path, seed: int = 0) -> Path:
    """Write the pipeline's synthetic demo source under ``root`` once (reused when present)."""
    from distillkit.pipelines.registry import SYNTH

    assert pipeline.demo is not None
    data = root / pipeline.demo.synth
    marker = data / ".distillkit-synth-complete"
    if not marker.is_file():
        SYNTH.get(pipeline.demo.synth)(data, seed=seed, size=pipeline.demo.size)
        marker.write_text(f"seed={seed} size={pipeline.demo.size}\n")
    return data


def run_demo(out: Path, steps: int = 120, workers: int = 2, only: list[str] | None = None) -> dict[str, Any]:
    """synth -> build (embedded LocalCluster) -> verify -> show -> train -> evaluate, per pipeline.

    Args:
        out: everything goes under it: ``data/``, ``shards/NAME``, ``NAME-sample.png``, ``runs/METHOD``.
        steps: training steps per method.
        workers: LocalCluster worker processes.
        only: pipeline names to run (default: every registered pipeline with a demo).

    Returns:
        Per pipeline name, what each step produced, so tests can check the demo as a user would.
    """
    from distillkit.pipelines.inspect import show, stats_text, verify
    from distillkit.pipelines.registry import PIPELINES
    from distillkit.pipelines.runner import build
    from distillkit.train.loop import format_metrics
    from distillkit.train.registry import TRAINERS

    out = Path(out)
    names = only or [n for n in PIPELINES.names() if PIPELINES.get(n).demo is not None]
    trainers = {n: TRAINERS.get(n) for n in TRAINERS.names()}
    results: dict[str, Any] = {}
    for name in names:
        pipeline = PIPELINES.get(name)
        shards = out / "shards" / name
        click.echo(f"== {name}")
        click.echo(f"[1/5] synthetic {pipeline.demo.synth if pipeline.demo else '?'} -> {out / 'data'}")
        data = make_demo_data(pipeline, out / "data")
        click.echo(f"[2/5] build {name} shards on a LocalCluster of {workers} workers -> {shards}")
        result = build(demo_manifest(pipeline, data, shards, f"cluster.workers={workers}"))
        click.echo(stats_text(shards))
        click.echo("[3/5] verify")
        report = verify(shards)
        click.echo(f"  {report.shards} shards, {report.samples} samples, {len(report.problems)} faults")
        if not report.ok:
            raise click.ClickException("verify found faults: " + "; ".join(report.problems[:5]))
        picture = out / f"{name}-sample.png"
        key = show(shards, picture)
        click.echo(f"[4/5] picture of sample {key} -> {picture}")
        entry: dict[str, Any] = {"build": result, "verify": report, "picture": picture, "train": {}}
        for method, trainer in trainers.items():
            if trainer.pipeline != name:
                continue
            click.echo(f"[5/5] train {method} for {steps} steps, then its evaluation")
            _one_thread_unless_asked()
            config = trainer.resolve_config({"max_steps": steps})
            metrics = trainer.train(shards, out / "runs" / method, config, device="cpu")
            evaluation = trainer.evaluate(Path(metrics["checkpoint"]), [shards], config, device="cpu",
                                          options=trainer.resolve_eval_options({}))
            click.echo("  train: " + format_metrics(metrics))
            click.echo(trainer.format_eval(evaluation))
            entry["train"][method] = {"metrics": metrics, "eval": evaluation}
        results[name] = entry
    return results


def _one_thread_unless_asked() -> None:
    """The demo's small networks train 2x faster with one torch thread than with one per core on a 2-core
    machine (thread synchronisation outweighs the work: docs/decisions.md "Torch threads"); a user who sets
    ``OMP_NUM_THREADS`` keeps their choice."""
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
