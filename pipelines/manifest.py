"""TOML manifests: read, apply ``--set`` overrides, validate against a schema, hash.

Every key a manifest may hold is declared in a schema (``Section`` of ``Key`` entries), so
unknown keys, wrong types and missing input paths are reported before any work starts, as
one line naming the file, the dotted key and the reason. This module is a leaf: it knows no
pipeline and validates against the schema it is given (``pipelines.catalog.load_manifest``
looks the pipeline up and hands its schema over). Trainer configurations use the same
``Key`` machinery.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillkit.pipelines.shards import NOT_IN_NAMES
from distillkit.remote import is_remote, location


class ManifestError(Exception):
    """A user error in a manifest: ``file: key: reason`` (printed without a traceback)."""

    def __init__(self, file: str | Path, key: str, reason: str):
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")
        self.file, self.key, self.reason = str(file), key, reason


@dataclass(frozen=True)
class Key:
    """One manifest value. ``kind`` is a Python type (``float`` also accepts ints) or
    ``"path"`` / ``"existing_path"``; ``choices`` restricts the value."""

    kind: Any
    default: Any = None
    required: bool = False
    choices: tuple[Any, ...] | None = None
    doc: str = ""


Section = dict[str, "Key | Section"]

COMMON_SCHEMA: Section = {
    "name": Key(str, required=True, doc="shard file prefix, dot-free"),
    "pipeline": Key(str, required=True),
    "output": {
        "dir": Key("path", required=True),
        "samples_per_shard": Key(int, 128),
        "max_rejected": Key(float, 0.01, doc="fraction of samples (windows, keyframes, ...) rejected: "
                                             "rejected / (written + rejected); above it build exits 1"),
    },
    "cluster": {
        "scheduler": Key(str, "", doc='"" = embedded LocalCluster, "serial" = in-process, else "tcp://host:8786"'),
        "workers": Key(int, 2),
        "threads_per_worker": Key(int, 1),
        "gpu_workers": Key(int, -1, doc="embedded cluster's workers that own a GPU (dask resource GPU): -1 = one per "
                                        "visible CUDA device when the pipeline has a torch stage, else none"),
        # A job queue (pipelines.jobqueue): the build submits its own workers; the keys below apply only then.
        "kind": Key(str, "local", choices=("local", "slurm", "pbs"),
                    doc='"local" = scheduler/workers above; "slurm" / "pbs" = submit workers as batch jobs'),
        "queue": Key(str, "", doc="SLURM partition / PBS queue (\"\" = the queue's default)"),
        "account": Key(str, "", doc="account charged for the jobs (\"\" = your default)"),
        "walltime": Key(str, "", doc='each job\'s time limit, "[D-]HH:MM:SS" (required with a job queue; no bare '
                                     'number: SLURM reads minutes, PBS seconds)'),
        "jobs": Key(int, 1, doc="CPU jobs submitted"),
        "cores": Key(int, 1, doc="cores per CPU job"),
        "memory": Key(str, "4GiB", doc="memory per job"),
        "processes": Key(int, 1, doc="dask worker processes per CPU job (they share its cores)"),
        "gpu_jobs": Key(int, 0, doc="GPU jobs submitted besides the CPU jobs, for the torch stages"),
        "gpu_queue": Key(str, "", doc="partition / queue of the GPU jobs (\"\" = queue)"),
        "gpus_per_job": Key(int, 1, doc="GPUs per GPU job (--gres=gpu:N / ngpus=N), one worker advertising GPU=1 "
                                        "per GPU"),
        "job_extra_directives": Key(list, [], doc='more header lines, e.g. ["--constraint=avx2"] (SLURM)'),
        "job_script_prologue": Key(list, [], doc='shell lines run before the worker, e.g. ["module load python", '
                                                 '"source ~/venv/bin/activate"]'),
        "interface": Key(str, "", doc='network interface of scheduler and workers, e.g. "ib0" (\"\" = default)'),
        "local_directory": Key(str, "", doc="workers' scratch folder on each node, e.g. \"$TMPDIR\""),
        "log_directory": Key(str, "", doc="folder for the jobs' stdout/stderr (\"\" = the queue's default)"),
        "python": Key(str, "", doc="the jobs' Python interpreter, which runs each dask worker (\"\" = the one "
                                   "running distillkit build, by its absolute path)"),
        "join_timeout": Key(int, 300, doc="seconds to wait for every job's workers to join before giving up"),
    },
}

# Sections that do not change what is written: excluded from the content hash, so moving
# the output or changing the cluster never invalidates finished shards.
_NOT_CONTENT = ("cluster",)


@dataclass
class Manifest:
    """A validated manifest: ``data`` holds every key with defaults filled in."""

    path: Path
    data: dict[str, Any]
    overrides: list[str] = field(default_factory=list)

    def get(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            node = node[part]
        return node

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def pipeline(self) -> str:
        return self.data["pipeline"]

    @property
    def output_dir(self) -> Path | str:
        """The output folder: a ``Path``, or a URL string for object storage (``distillkit.remote.location``)."""
        return location(self.data["output"]["dir"])

    def content_hash(self) -> str:
        """sha256 of everything that determines shard bytes (not cluster settings)."""
        content = {k: v for k, v in self.data.items() if k not in _NOT_CONTENT}
        content = copy.deepcopy(content)
        content["output"].pop("dir", None)
        content["output"].pop("max_rejected", None)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def parse_override(text: str, file: str | Path) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value); the value parses as a TOML literal, else a string."""
    if "=" not in text:
        raise ManifestError(file, text, "--set needs KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KeyError(key)
    node[parts[-1]] = value


def _check_value(file: Path, dotted: str, spec: Key, value: Any) -> Any:
    kind = spec.kind
    if value is None and spec.default is None and not spec.required:
        return None  # "unset" (TOML has no null; a stored trainer configuration does)
    if kind in ("path", "existing_path"):
        if not isinstance(value, str) or not value:
            raise ManifestError(file, dotted, f"expected a path string, got {value!r}")
        if kind == "path" and is_remote(value):  # an output in object storage: Path() would fold s3:// to s3:/
            return value
        path = Path(value).expanduser()
        if kind == "existing_path" and not path.exists():
            raise ManifestError(file, dotted, f"path does not exist: {path}")
        return str(path)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and isinstance(value, datetime.time):
        # ``walltime = 01:00:00`` (or ``--set cluster.walltime=01:00:00``) is a TOML local time, meant as its text
        value = value.isoformat()
    if kind is list:
        if not isinstance(value, list):
            raise ManifestError(file, dotted, f"expected a list, got {type(value).__name__} {value!r}")
    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(file, dotted, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ManifestError(file, dotted, f"must be one of {list(spec.choices)}, got {value!r}")
    return value


def _validate(file: Path, schema: Section, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in data:
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ManifestError(file, prefix + key, f"unknown key (known here: {known})")
    for key, spec in schema.items():
        dotted = prefix + key
        if isinstance(spec, dict):
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise ManifestError(file, dotted, "expected a table")
            out[key] = _validate(file, spec, value, dotted + ".")
        elif key in data:
            out[key] = _check_value(file, dotted, spec, data[key])
        elif spec.required:
            raise ManifestError(file, dotted, "missing required key")
        else:
            out[key] = copy.deepcopy(spec.default)
    return out


def merge_schema(base: Section, extra: Section) -> Section:
    """The common schema plus one pipeline's sections (deep merge)."""
    merged: Section = dict(base)
    for key, spec in extra.items():
        if isinstance(spec, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_schema(merged[key], spec)  # type: ignore[arg-type]
        else:
            merged[key] = spec
    return merged


def read_manifest(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a TOML manifest and apply ``--set`` overrides (not yet validated).

    Raises:
        ManifestError: a missing file, invalid TOML or an override that crosses a value.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "", "manifest file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(path, "", f"not valid TOML: {exc}") from None
    apply_overrides(data, overrides or [], path)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], file: str | Path) -> None:
    """Set each ``KEY=VALUE`` of ``overrides`` into ``data`` by dotted path (in place)."""
    for text in overrides:
        key, value = parse_override(text, file)
        try:
            _set_dotted(data, key, value)
        except KeyError:
            raise ManifestError(file, key, "--set path crosses a non-table value") from None


def validate(file: str | Path, schema: Section, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked against ``schema``, defaults filled in; raises a one-line ``ManifestError``
    (unknown key, wrong type, bad choice, missing path) naming ``file`` and the dotted key."""
    return _validate(Path(file), schema, data)


def validate_manifest(path: str | Path, data: dict[str, Any], schema: Section,
                      overrides: list[str] | None = None) -> Manifest:
    """A ``Manifest`` from raw ``data``, validated against the common schema merged with a
    pipeline's ``schema``. This module knows no pipeline: the caller hands it the schema."""
    path = Path(path)
    resolved = _validate(path, merge_schema(COMMON_SCHEMA, schema), data)
    manifest = Manifest(path=path, data=resolved, overrides=list(overrides or []))
    _check_common(manifest)
    return manifest


def _check_common(m: Manifest) -> None:
    # the name starts every shard's file name, which readers take only as a plain name (shards.plain_shard_name:
    # nothing a URL would decode or cut, '%', '?', '#', nor a separator)
    if not m.name or "." in m.name or NOT_IN_NAMES.intersection(m.name):
        raise ManifestError(m.path, "name", f"must be non-empty and free of . / \\ % ? # and NUL, got {m.name!r}")
    out = m.data["output"]
    if out["samples_per_shard"] < 1:
        raise ManifestError(m.path, "output.samples_per_shard", "must be >= 1")
    if not 0.0 <= out["max_rejected"] <= 1.0:
        raise ManifestError(m.path, "output.max_rejected", "must be a fraction in [0, 1]")
    if m.data["cluster"]["workers"] < 1:
        raise ManifestError(m.path, "cluster.workers", "must be >= 1")
    from distillkit.pipelines.jobqueue import check_cluster

    check_cluster(m.path, m.data["cluster"])


def check_output_outside(m: Manifest, source_key: str) -> None:
    """Refuse an output directory inside (or equal to) the source tree: a rerun would read
    its own shards as input and a cleanup could delete the data.

    Args:
        m: the manifest.
        source_key: the dotted key of its local source folder (``source.root``).
    """
    output = m.output_dir
    if isinstance(output, str):
        from distillkit.remote import local_path

        local = local_path(output)  # a file:// URL is the local folder it names
        if local is None:
            return  # object storage: never inside a local source tree
        output = local
    src = Path(m.get(source_key)).resolve()
    out = output.resolve()
    if out == src or src in out.parents:
        raise ManifestError(m.path, "output.dir", f"{out} lies inside the source {source_key}={src}")
