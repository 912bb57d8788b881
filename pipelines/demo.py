"""``distillkit demo``: every stage of the toolkit on synthetic data, end to end."""

from __future__ import annotations

from pathlib import Path

import click

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def run_demo(out: Path, steps: int = 120, workers: int = 2) -> dict[str, object]:
    """synth -> build (embedded LocalCluster) -> verify -> show -> train -> eval, for slidr.

    Returns what each step produced, so tests can check the demo as a user would.
    """
    from pipelines.inspect import show, stats_text, verify
    from pipelines.manifest import load_manifest
    from pipelines.runner import build
    from sensors.synth_nuscenes import make_nuscenes
    from train.loop import format_metrics
    from train.probe import format_probe
    from train.registry import TRAINERS

    out = Path(out)
    data = out / "data" / "nuscenes"
    shards = out / "shards" / "slidr"
    click.echo(f"[1/5] synthetic nuScenes -> {data}")
    if not (data / "v1.0-mini").is_dir():
        make_nuscenes(data, seed=0, size="small")
    click.echo(f"[2/5] build slidr shards on a LocalCluster of {workers} workers -> {shards}")
    m = load_manifest(MANIFESTS / "demo-slidr.toml",
                      [f"source.dataroot={data}", f"output.dir={shards}", f"cluster.workers={workers}"])
    result = build(m)
    click.echo(stats_text(shards))
    click.echo("[3/5] verify")
    report = verify(shards)
    click.echo(f"  {report.shards} shards, {report.samples} samples, {len(report.problems)} faults")
    if not report.ok:
        raise click.ClickException("verify found faults: " + "; ".join(report.problems[:5]))
    picture = out / "slidr-sample.png"
    key = show(shards, picture)
    click.echo(f"[4/5] picture of sample {key} -> {picture}")
    click.echo(f"[5/5] train slidr for {steps} steps, then the linear probe")
    trainer = TRAINERS["slidr"]
    metrics = trainer.train_main(shards=shards, out=out / "runs" / "slidr", device="cpu", max_steps=steps)
    probe = trainer.eval_main(checkpoint=Path(metrics["checkpoint"]), shards=shards, device="cpu")
    click.echo("  train: " + format_metrics(metrics))
    click.echo(format_probe(probe))
    return {"build": result, "verify": report, "picture": picture, "train": metrics, "probe": probe}
