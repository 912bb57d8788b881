"""``distillkit demo``: every stage of the toolkit on synthetic data, end to end, for every
registered pipeline that declares a ``Demo`` (and the trainers that read its shards)."""

from __future__ import annotations

import json
import os
import time
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


def run_demo(out: Path, steps: int | None = None, workers: int = 2, only: list[str] | None = None,
             seed: int = 0) -> dict[str, Any]:
    """synth -> build (embedded LocalCluster) -> verify -> show -> train -> evaluate, per pipeline,
    then one summary table (also written to ``out/summary.json``).

    Args:
        out: everything goes under it: ``data/``, ``shards/NAME``, ``NAME-sample.png``, ``runs/METHOD``,
            ``summary.json``.
        steps: training steps per method (default: each trainer's ``demo`` configuration).
        workers: LocalCluster worker processes.
        only: pipeline names to run (default: every registered pipeline with a demo).
        seed: seeds the synthetic data and training (``bench/demo_seeds.py`` runs several).

    Returns:
        Per pipeline name, what each step produced, so tests can check the demo as a user would.
    """
    from distillkit.folder_lock import FolderBusy, folder_lock
    from distillkit.pipelines.inspect import show, stats_text, verify
    from distillkit.pipelines.registry import PIPELINES
    from distillkit.pipelines.runner import build
    from distillkit.pipelines.train_cli import RUN_LOCK
    from distillkit.train.loop import format_metrics
    from distillkit.train.registry import TRAINERS

    out = Path(out)
    # Read before the first LocalCluster starts: dask sets OMP_NUM_THREADS=1 in this process's environment
    # for its workers, which would otherwise look like the user's own choice below.
    threads_asked = "OMP_NUM_THREADS" in os.environ
    names = only or [n for n in PIPELINES.names() if PIPELINES.get(n).demo is not None]
    trainers = {n: TRAINERS.get(n) for n in TRAINERS.names()}
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name in names:
        pipeline = PIPELINES.get(name)
        shards = out / "shards" / name
        click.echo(f"== {name}")
        click.echo(f"[1/5] synthetic {pipeline.demo.synth if pipeline.demo else '?'} -> {out / 'data'}")
        data = make_demo_data(pipeline, out / "data", seed=seed)
        click.echo(f"[2/5] build {name} shards on a LocalCluster of {workers} workers -> {shards}")
        t0 = time.perf_counter()
        result = build(demo_manifest(pipeline, data, shards, f"cluster.workers={workers}"))
        build_s = time.perf_counter() - t0
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
        base_row = {"pipeline": name, "written": result.written, "rejected": len(result.rejected),
                    "build_s": round(build_s, 1), "picture": str(picture)}
        methods = [m for m, t in trainers.items() if t.pipeline == name and t.demo is not None]
        for method in methods:
            trainer = trainers[method]
            layers = [trainer.demo, {"seed": seed}, {"max_steps": steps} if steps else {}]
            config = trainer.resolve_config(*layers)
            click.echo(f"[5/5] train {method} for {config['max_steps']} steps, then its evaluation")
            _one_thread_unless_asked(threads_asked)
            run_dir = out / "runs" / method
            t0 = time.perf_counter()
            run_dir.mkdir(parents=True, exist_ok=True)
            try:  # the run lock `distillkit train` holds: a `train --resume` of this folder must not join in
                with folder_lock(run_dir, RUN_LOCK, what="run"):
                    metrics = trainer.train(shards, run_dir, config, device="cpu")
            except FolderBusy:
                raise click.ClickException(f"{run_dir}: another run is writing this folder; wait for it to end, "
                                           "or give the demo another --out") from None
            train_s = time.perf_counter() - t0
            evaluation = trainer.evaluate(Path(metrics["checkpoint"]), [shards], config, device="cpu",
                                          options=trainer.resolve_eval_options(dict(trainer.demo_eval)))
            click.echo("  train: " + format_metrics(metrics))
            click.echo(trainer.format_eval(evaluation))
            head = trainer.headline(evaluation)
            entry["train"][method] = {"metrics": metrics, "eval": evaluation, "headline": head}
            rows.append({**base_row, "method": method, "steps": int(metrics.get("step", config["max_steps"])),
                         "train_s": round(train_s, 1), **head, "run_dir": str(run_dir)})
        if not methods:
            rows.append({**base_row, "method": None})
        results[name] = entry
    click.echo(format_summary(rows))
    write_summary(out / "summary.json", rows, seed)
    click.echo(f"summary -> {out / 'summary.json'}")
    return results


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The demo's closing table: one row per pipeline and method (see ``run_demo``)."""
    header = ("pipeline", "written", "rejected", "build", "method", "steps", "train", "metric",
              "distilled", "random", "gain", "run folder")

    def num(v: Any, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [[r["pipeline"], str(r["written"]), str(r["rejected"]), f"{r['build_s']:.0f} s",
              r.get("method") or "-", num(r.get("steps"), "d"),
              "-" if r.get("train_s") is None else f"{r['train_s']:.0f} s", r.get("metric") or "-",
              num(r.get("distilled")), num(r.get("random")), num(r.get("gain"), "+.3f"), r.get("run_dir") or "-"]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 4, 7, 11) else '>'}{w}}}" for i, w in enumerate(widths))
    out = [("== summary (linear probe on examples it did not train on: the distilled network against the same "
            "network at random init)"),
           fmt.format(*header)]
    out += [fmt.format(*line) for line in lines]
    out += [f"pictures: {', '.join(dict.fromkeys(r['picture'] for r in rows))}"]
    return "\n".join(out)


def write_summary(path: Path, rows: list[dict[str, Any]], seed: int) -> None:
    """``summary.json``: per method ``metric``, ``distilled``, ``random``, ``gain``, ``run_dir`` and the
    build and training figures of its pipeline."""
    methods = {r["method"]: {k: v for k, v in r.items() if k != "method"} for r in rows if r.get("method")}
    path.write_text(json.dumps({"seed": seed, "methods": methods}, indent=2, sort_keys=True) + "\n")


def _one_thread_unless_asked(asked: bool) -> None:
    """The demo's small networks train 2x faster with one torch thread than with one per core on a 2-core
    machine (thread synchronisation outweighs the work: docs/decisions.md "Torch threads"); a user who set
    ``OMP_NUM_THREADS`` before the demo started (``asked``) keeps their choice."""
    import torch

    if not asked:
        torch.set_num_threads(1)
