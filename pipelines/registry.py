"""Pipeline name -> pipeline object. A new pipeline plugs in here (see docs/architecture.md)."""

from __future__ import annotations

from typing import Any


def _pipelines() -> dict[str, Any]:
    # Imported lazily: the CLI's --help and workers that never build need none of them.
    from pipelines.slidr import SlidrPipeline

    return {"slidr": SlidrPipeline()}


def get_pipeline(name: str) -> Any:
    pipelines = _pipelines()
    if name not in pipelines:
        raise KeyError(f"unknown pipeline {name!r} (known: {', '.join(sorted(pipelines))})")
    return pipelines[name]


def pipeline_names() -> list[str]:
    return sorted(_pipelines())
