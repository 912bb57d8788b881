"""The toy pipeline: a ref is a whole recording; its windows are enumerated on the worker; a
"teacher" (a seeded torch layer) is set up once per worker and embeds windows in batches that
cross recording boundaries."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from distillkit.pipelines.base import Built, Demo, FieldSpec, Pipeline, Rejected, Rejection, Sample, SampleRef, guarded
from distillkit.pipelines.codecs import SampleView, json_bytes, npy_bytes
from distillkit.pipelines.manifest import Key, Manifest, ManifestError, check_output_outside
from distillkit.pipelines.schema import expect_array

SETUP_PIDS: list[int] = []  # one entry per setup() in this process: the test checks "once per worker"


def make_teacher(length: int, dim: int, seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(length, 16), torch.nn.Tanh(), torch.nn.Linear(16, dim)).eval()


class ToyPipeline(Pipeline):
    name = "toy"
    source_key = "source.root"
    demo = Demo(synth="toy", manifest="distillkit_toy:demo-toy.toml")
    schema = {
        "source": {"root": Key("existing_path", required=True)},
        "stages": {
            "window": {"length": Key(int, 32), "hop": Key(int, 32)},
            "teacher": {"dim": Key(int, 8), "batch": Key(int, 4), "seed": Key(int, 0)},
        },
        "output": {"recordings_per_shard": Key(int, 2)},
    }

    def __init__(self) -> None:
        self.teacher: Any = None

    def check_manifest(self, m: Manifest) -> None:
        check_output_outside(m, "source.root")
        if m.get("stages.window.length") < 2:
            raise ManifestError(m.path, "stages.window.length", "must be >= 2")

    def plan(self, m: Manifest) -> tuple[list[SampleRef], list[dict[str, str]]]:
        root = Path(m.get("source.root"))
        refs = [SampleRef(p.stem, str(p.relative_to(root)), {"files": [str(p)]}) for p in sorted(root.glob("*.csv"))]
        return refs, []

    def refs_per_shard(self, m: Manifest) -> int:
        return m.get("output.recordings_per_shard")

    def setup(self, m: Manifest) -> None:
        SETUP_PIDS.append(os.getpid())
        w, t = m.data["stages"]["window"], m.data["stages"]["teacher"]
        self.teacher = make_teacher(w["length"], t["dim"], t["seed"])

    def samples(self, ref: SampleRef, m: Manifest) -> Iterable[Built]:
        length, hop = m.get("stages.window.length"), m.get("stages.window.hop")
        try:
            values = np.loadtxt(ref.payload["files"][0], skiprows=1, dtype=np.float32, ndmin=1)
        except ValueError as exc:
            raise Rejected("read", str(exc)) from None
        starts = range(0, len(values) - length + 1, hop)
        for i, t0 in enumerate(starts):
            meta = {"recording": ref.key, "start": t0, "length": length}
            yield Sample(f"{ref.key}_{i:06d}", {"signal.npy": npy_bytes(values[t0:t0 + length]),
                                                "meta.json": json_bytes(meta)}, f"{ref.source}@{t0}")
        tail = (starts[-1] + hop) if len(starts) else 0
        if tail < len(values):
            yield Rejection(f"{ref.source}@{tail}", "window", f"partial window of {len(values) - tail} rows")

    def build_refs(self, refs: list[SampleRef], m: Manifest, raise_errors: bool = False) -> Iterator[Built]:
        import torch

        assert SETUP_PIDS.count(os.getpid()) == 1, "setup must run exactly once per worker process"
        batch = m.get("stages.teacher.batch")
        pending: list[Built] = []

        def flush() -> Iterator[Built]:
            done = [x for x in pending if isinstance(x, Sample)]
            if done:
                x = torch.from_numpy(np.stack([_signal(s) for s in done]))
                with torch.no_grad():
                    emb = self.teacher(x).numpy().astype(np.float32)
                for s, e in zip(done, emb, strict=True):
                    s.fields["teacher.npy"] = npy_bytes(e)
            yield from pending
            pending.clear()

        for ref in refs:
            for item in guarded(ref, lambda ref=ref: self.samples(ref, m), raise_errors):
                pending.append(item)
                if sum(isinstance(x, Sample) for x in pending) == batch:
                    yield from flush()
        yield from flush()

    def fields(self, sample: SampleView) -> dict[str, FieldSpec]:
        return {
            "signal.npy": FieldSpec("float32 (length,) window", check=lambda a, s: expect_array(a, "float32", 1)),
            "teacher.npy": FieldSpec("float32 (dim,) teacher embedding",
                                     check=lambda a, s: expect_array(a, "float32", 1)),
            "meta.json": FieldSpec("recording, start, length", check=_check_meta),
        }

    def sample_stats(self, sample: SampleView) -> dict[str, float]:
        x = sample["signal.npy"].astype(np.float64)
        return {"samples": 1.0, "values": float(len(x)), "sum": float(x.sum()), "sqsum": float((x**2).sum())}

    def finalize_stats(self, totals: dict[str, float]) -> dict[str, float]:
        n = totals.get("values", 0.0)
        if not n:
            return {}
        mean = totals["sum"] / n
        std = float(np.sqrt(max(totals["sqsum"] / n - mean**2, 0.0)))
        return {"samples": totals["samples"], "mean": mean, "std": std}

    def render(self, sample: SampleView) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.5))
        a.plot(sample["signal.npy"])
        a.set_title(f"{sample['meta.json']['recording']} @ {sample['meta.json']['start']}")
        b.bar(range(len(sample["teacher.npy"])), sample["teacher.npy"])
        b.set_title("teacher embedding")
        return fig


def _signal(s: Sample) -> np.ndarray:
    from distillkit.pipelines.codecs import load_npy

    return load_npy(s.fields["signal.npy"])


def _check_meta(meta: Any, sample: SampleView) -> None:
    if not isinstance(meta, dict) or meta.get("length") != len(sample["signal.npy"]):
        raise ValueError("meta.json length differs from signal.npy")
