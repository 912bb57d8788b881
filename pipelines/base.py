"""The pipeline contract shared by every method: plan, set up, build, schema, picture.

A pipeline never knows which executor runs it. The runner (``pipelines.runner``) calls
``plan`` once on the client, cuts the refs into shards and ships one task per shard to an
executor (dask, or in-process with ``--scheduler serial``). On a worker, the pipeline is set
up once per process (``setup``: load a model, open a device), then ``build_refs`` streams the
shard's samples (or rejections) straight into the shard writer. ``verify``, ``show`` and
``stats`` read ``fields``, ``render`` and the statistics back.

Three levels to override, from the simplest:

- ``build(ref, m)``: one ref -> one sample (SLidR: a keyframe).
- ``samples(ref, m)``: one ref -> many samples, enumerated on the worker (a recording ->
  its windows, with keys such as ``{ref.key}_{window:06d}``; the plan never probes durations).
- ``build_refs(refs, m)``: a shard's refs -> its samples, free to batch across refs (a batch
  of images through a GPU model loaded in ``setup``); ``batched`` and ``guarded`` help.

See ``docs/architecture.md`` for a worked example of a windowed pipeline with a GPU model.
"""

from __future__ import annotations

import re
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from distillkit.pipelines.codecs import SampleView

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from distillkit.pipelines.manifest import Manifest, Section

T = TypeVar("T")


class Rejected(Exception):
    """Raised for one unusable input; the runner records ``{source, stage, reason}`` and goes on."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class SampleRef:
    """Everything a worker needs to build the samples of one input, computed on the client.

    ``key`` is the dot-free shard key (or the prefix of its windows' keys), ``source`` names
    the input for error reports and ``payload`` holds plain data only (paths, lists of
    floats): it travels to workers and is hashed into the input fingerprint, so it must be
    JSON-serialisable.
    """

    key: str
    source: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One built sample: its shard key, its encoded fields and the input it came from."""

    key: str
    fields: dict[str, bytes]
    source: str


@dataclass(frozen=True)
class Rejection:
    """An input (or one window of it) that could not be used, with the stage and the reason."""

    source: str
    stage: str
    reason: str

    def to_json(self) -> dict[str, str]:
        # A name that is not valid UTF-8 (kept as surrogates by os.fsdecode) is written with its bytes as \xNN, so
        # index.json stays valid UTF-8 and still shows the name (sensors.listing.printable).
        from distillkit.sensors.listing import printable

        return {"source": printable(self.source), "stage": self.stage, "reason": printable(self.reason)}


Built = Sample | Rejection


@dataclass(frozen=True)
class FieldSpec:
    """One shard field: what it holds and a check of its decoded content.

    ``check(value, sample)`` gets the field decoded by ``pipelines.codecs`` (arrays for
    ``.npy``, objects for ``.json``, label arrays for label PNGs, bytes for photographs) and the
    whole ``SampleView`` for cross-field checks (decoded once, shared by every check and by the
    statistics); it raises ``ValueError`` with a reason.
    """

    description: str
    required: bool = True
    check: Callable[[Any, SampleView], None] | None = None


@dataclass(frozen=True)
class Demo:
    """How ``distillkit demo`` and the conformance tests make data for a pipeline.

    ``synth``: the ``distillkit synth`` kind that writes its inputs; ``manifest``: a packaged
    manifest name (``"demo-slidr"``) or ``"package:file.toml"`` for a plugin's own;
    ``size``: the synth size used.
    """

    synth: str
    manifest: str
    size: str = "small"


class Pipeline(ABC):
    """Base class of every pipeline (built-in or plugin). Subclasses set the class attributes
    and implement ``plan``, ``fields``, ``render`` and one of the build levels."""

    name: ClassVar[str]
    schema: ClassVar[Section] = {}
    """Manifest sections beyond the common ones (``pipelines.manifest.Key`` leaves)."""
    source_key: ClassVar[str] = "source.root"
    """The manifest key of the input tree: overridden by the demo, kept apart from the output."""
    demo: ClassVar[Demo | None] = None
    units: ClassVar[tuple[str, str]] = ("samples", "inputs")
    """What one sample and one input are, plural, for messages such as ``output.max_rejected``'s:
    ``("windows", "recordings")``; the same word twice when each input gives one sample."""
    stat_units: ClassVar[dict[str, str]] = {}
    """What each statistic of ``finalize_stats`` counts or measures, by name (a regular expression matching
    the whole name): ``{"seconds": "seconds of audio"}``. Why: ``stats`` prints "165.1 seconds of audio", not a
    bare "seconds: 165.1"; the build writes each statistic's unit into ``index.json`` (``stat_units``), so
    ``stats`` stays a read of that file. Default: none described (``samples`` always is: ``STAT_UNITS``)."""

    # ---- client ----------------------------------------------------------------------
    def check_manifest(self, m: Manifest) -> None:  # noqa: B027 - optional hook
        """Cross-key checks after type validation; raises ``ManifestError``."""

    @abstractmethod
    def plan(self, m: Manifest) -> tuple[list[SampleRef], list[dict[str, str]]]:
        """Cheap and deterministic, on the client: every input in shard order, plus the
        inputs already rejected while planning (``{source, stage, reason}``)."""

    def refs_per_shard(self, m: Manifest) -> int:
        """How many refs one shard task gets. A windowed pipeline whose refs are whole
        recordings returns fewer than ``output.samples_per_shard``."""
        return int(m.data["output"]["samples_per_shard"])

    def torch_stages(self, m: Manifest) -> dict[str, str]:
        """The stages this manifest runs on torch, each with its requested device (``"auto"``,
        ``"cpu"``, ``"cuda"``). They are called through ``pipelines.placement.run_stage``, which
        sends their batches to the cluster's GPU workers when it has some; ``index.json``
        records the devices they ran on."""
        return {}

    def input_files(self, ref: SampleRef) -> list[str]:
        """The files the build reads for ``ref``: their sizes and mtimes decide shard reuse."""
        return [str(p) for p in ref.payload.get("files", [])]

    # ---- worker ----------------------------------------------------------------------
    def setup(self, m: Manifest) -> None:  # noqa: B027 - optional hook
        """Once per worker process and manifest, before any build: load a model, open a device."""

    def build(self, ref: SampleRef, m: Manifest) -> dict[str, bytes]:
        """One ref -> one sample's fields; raises ``Rejected`` on bad input."""
        raise NotImplementedError(f"{type(self).__name__} implements neither build nor samples")

    def samples(self, ref: SampleRef, m: Manifest) -> Iterable[Built]:
        """One ref -> its samples (and rejected windows, as ``Rejection``), in key order."""
        return [Sample(ref.key, self.build(ref, m), ref.source)]

    def build_refs(self, refs: list[SampleRef], m: Manifest, raise_errors: bool = False) -> Iterator[Built]:
        """A shard's refs -> its samples in shard order, streamed (never all held at once).

        Args:
            refs: the shard's refs, in plan order.
            m: the manifest.
            raise_errors: let unexpected exceptions propagate (``build --raise-errors``)
                instead of rejecting the input with the exception as reason.
        """
        for ref in refs:
            yield from guarded(ref, lambda ref=ref: self.samples(ref, m), raise_errors)

    # ---- schema, statistics, picture ---------------------------------------------------
    @abstractmethod
    def fields(self, sample: SampleView) -> dict[str, FieldSpec]:
        """The schema of one sample (field name -> spec); may depend on the sample."""

    def sample_stats(self, sample: SampleView) -> dict[str, float]:
        """Additive per-sample statistics (sums and counts), summed per shard and run."""
        return {"samples": 1.0}

    def finalize_stats(self, totals: dict[str, float]) -> dict[str, float]:
        """Dataset statistics for ``index.json`` (means, stds) from the summed totals."""
        return dict(totals)

    @abstractmethod
    def render(self, sample: SampleView) -> Figure:
        """What ``distillkit show`` draws (saved at ``SHOW_DPI``)."""

    def show_preference(self) -> tuple[Callable[[SampleView], float], float] | None:
        """Which sample ``distillkit show`` draws without ``--key``: a score of a sample and the score that is
        good enough; ``show`` takes the first sample scoring that much, else the best of the first
        ``pipelines.inspect.SHOW_SCAN``. Why: a pipeline whose first sample makes a poor picture (audio: a
        short file padded to the segment length, three quarters zero) can point at a better one.
        Default: None, the first sample."""
        return None

    def unit_of_stat(self, key: str) -> str:
        """What the statistic ``key`` counts or measures, from ``stat_units`` and ``STAT_UNITS`` ("" when not
        described).

        Args:
            key: a name ``finalize_stats`` returns.
        """
        for table in (self.stat_units, STAT_UNITS):
            for pattern, unit in table.items():
                if re.fullmatch(pattern, key):
                    return unit
        return ""


STAT_UNITS: dict[str, str] = {"samples": "samples written"}
"""Units of the statistics every pipeline has (``Pipeline.sample_stats``' default)."""
SHOW_DPI = 110
"""The resolution ``distillkit show`` saves a picture at: a ``render`` that sizes marks in pixels uses it."""


def guarded(ref: SampleRef, make: Callable[[], Iterable[Built]], raise_errors: bool = False) -> Iterator[Built]:
    """Run one ref's build, turning ``Rejected`` (and, unless ``raise_errors``, any unexpected
    exception: one strange file must not kill a long build) into a ``Rejection`` of that ref.
    Samples yielded before a failure are kept; the failure rejects the rest of the ref."""
    try:
        yield from make()
    except Rejected as exc:
        yield Rejection(ref.source, exc.stage, exc.reason)
    except Exception as exc:
        if raise_errors:
            raise
        yield Rejection(ref.source, "build", describe_exception(exc))


def describe_exception(exc: BaseException) -> str:
    """``Type: message (file.py:line)`` of the innermost frame: a reason fit for index.json."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Consecutive lists of ``n`` items (the last may be shorter): batches for a GPU stage."""
    if n < 1:
        raise ValueError("batch size must be >= 1")
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk
