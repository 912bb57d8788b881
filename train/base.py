"""The trainer contract: a method's typed configuration, ``train`` and ``evaluate``.

Each method declares its configuration as a schema of ``pipelines.manifest.Key`` entries (the
manifest machinery: types, choices, defaults, docs, one-line errors). The keys every trainer
shares (``max_steps``, ``batch_size``, ``num_workers``, ``seed``, ``log_every``) come from
``COMMON_SCHEMA``. ``distillkit train METHOD`` turns each top-level key into an option
(``--batch-size``), accepts ``--set key=value`` and ``--config FILE.toml``, and ``--help``
lists the method's own keys with their defaults. The resolved configuration is stored in every
checkpoint and in the run log, so ``eval`` and ``--resume`` read it back instead of asking.

Every ``train`` a trainer defines runs inside ``checkpoint.training_as(trainer.name)``
(``Trainer.__init_subclass__``), however it is called (the CLI, the demo, Python): its checkpoints store
the method's name and its ``curves.png`` is titled with it (``checkpoint.current_method``).
"""

from __future__ import annotations

import copy
import functools
import weakref
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from distillkit.pipelines.manifest import Key, ManifestError, Section, merge_schema, parse_override, validate

COMMON_SCHEMA: Section = {
    "max_steps": Key(int, 100, doc="optimiser steps (the cosine schedule spans them)"),
    "batch_size": Key(int, 2, doc="samples per optimiser step over all processes (the global batch; under torchrun "
                                   "each of N processes takes batch_size / N)"),
    "num_workers": Key(int, 0, doc="DataLoader worker processes (0 = load in the training process)"),
    "seed": Key(int, 0, doc="seeds weights, shuffling and augmentation"),
    "log_every": Key(int, 10, doc="steps per logged window (log.jsonl, console)"),
    "sync_batchnorm": Key(bool, None, doc="under torchrun, BatchNorm statistics over the global batch instead of each "
                                          "process's share (default: as the method's release, see --show-config)"),
    "on_corrupt_shard": Key(str, "stop", choices=("stop", "skip"),
                            doc="a shard whose sha256 differs from its record in index.json (known at its end): "
                                "stop training in one line, or go on with a counted warning (corrupt_shards), "
                                "dropping only its samples still in the shuffle buffer"),
}


_RUN_NAMING_WRAPPERS: weakref.WeakSet[Any] = weakref.WeakSet()
"""The ``train`` wrappers ``Trainer.__init_subclass__`` made (so a subclass never wraps one twice)."""


class ConfigError(ManifestError):
    """A bad training configuration value: ``where: key: reason`` in one line."""


class Trainer(ABC):
    """Base class of every trainer (built-in or plugin).

    Class attributes: ``name`` (the METHOD of ``distillkit train``), ``pipeline`` (whose
    shards it reads), ``schema`` (its own configuration keys) and a one-line ``summary``.
    """

    name: ClassVar[str]
    pipeline: ClassVar[str]
    schema: ClassVar[Section] = {}
    eval_schema: ClassVar[Section] = {}
    """Options of the method's evaluation (``distillkit eval METHOD --help``), apart from the
    training configuration, which ``eval`` reads from the checkpoint."""
    summary: ClassVar[str] = ""
    demo: ClassVar[dict[str, Any] | None] = {}
    """Configuration keys ``distillkit demo`` trains with (over the defaults): the steps, size and batch
    with which the method shows a gain over random init on its pipeline's demo data within the demo's
    time budget (figures over three seeds: ``bench/demo_seeds.py``, docs/training.md "The demo").
    None: the method is left out of the demo (its docs say why)."""
    demo_eval: ClassVar[dict[str, Any]] = {}
    """Evaluation options ``distillkit demo`` evaluates with (``eval_schema`` keys)."""

    def __init_subclass__(cls, **kwargs: Any):
        """Run every ``train`` a trainer class defines inside ``checkpoint.training_as(self.name)``.

        Why here: the run's method name (the checkpoint's ``"method"``, the title of ``curves.png``) must be
        right however ``train`` is called: ``distillkit train``, ``distillkit demo`` or a user's Python code.
        Wrapping at class creation covers all three, and every plugin, without any caller or trainer doing
        anything; a trainer's ``train`` calling ``super().train`` just sets the same name twice.
        """
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("train")
        if isinstance(own, staticmethod | classmethod):
            raise TypeError(f"{cls.__name__}.train must be a plain method (it is called on an instance)")
        # Our wrappers are known by identity, not by an attribute: functools.wraps copies attributes, so a
        # plugin's own ``@functools.wraps(Base.train)`` would otherwise look wrapped and never be.
        if own is None or getattr(own, "__isabstractmethod__", False) or own in _RUN_NAMING_WRAPPERS:
            return

        @functools.wraps(own)
        def train(self: Trainer, *args: Any, **kw: Any) -> dict[str, Any]:
            from distillkit.train.checkpoint import training_as

            with training_as(getattr(self, "name", None) or type(self).__name__):
                return own(self, *args, **kw)

        _RUN_NAMING_WRAPPERS.add(train)
        cls.train = train  # type: ignore[method-assign]

    @classmethod
    def config_schema(cls) -> Section:
        """The common keys merged with the method's own."""
        return merge_schema(COMMON_SCHEMA, cls.schema)

    @classmethod
    def resolve_config(
        cls,
        *layers: dict[str, Any],
        overrides: list[str] = (),  # type: ignore[assignment]
        where: str | Path = "",
        check: bool = True,
    ) -> dict[str, Any]:
        """Merge configuration ``layers`` (later wins; e.g. checkpoint, file, explicit options),
        then ``--set KEY=VALUE`` ``overrides``, and validate against ``config_schema``; with ``check`` (default) also
        the cross-key checks of ``check_config`` (``--show-config`` runs them apart, to print the configuration
        even when a run of it would be refused).

        Raises:
            ConfigError: unknown key, wrong type, bad choice, as ``where: key: reason``.
        """
        where = where or f"train {cls.name}"
        merged: dict[str, Any] = {}
        for layer in layers:
            _deep_update(merged, copy.deepcopy(layer or {}))
        for text in overrides:
            key, value = parse_override(text, where)
            node = merged
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        try:
            config = validate(where, cls.config_schema(), merged)
        except ManifestError as exc:
            raise ConfigError(exc.file, exc.key, exc.reason) from None
        if check:
            cls.check_config(config, where)
        return config

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str | Path) -> None:
        """Cross-key checks; raise ``ConfigError``. The default checks the common keys."""
        for key in ("max_steps", "batch_size", "log_every"):
            if config[key] is not None and config[key] < 1:  # None: the method's default applies
                raise ConfigError(where, key, "must be >= 1")
        if config["num_workers"] < 0:
            raise ConfigError(where, "num_workers", "must be >= 0")

    @abstractmethod
    def train(self, shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu",
              resume: bool = False, strict: bool = False) -> dict[str, Any]:
        """Train on ``shards``; checkpoints (holding ``config``) and the run log go to ``out``.

        Args:
            shards: a shard directory of this trainer's pipeline.
            out: run directory (``latest.pt``, ``log.jsonl``, ``curves.png``); None writes nothing.
            config: a resolved configuration (``resolve_config``).
            device: ``"cpu"`` or ``"cuda"``.
            resume: continue from ``out/latest.pt``.
            strict: stop at the first bad sample instead of skipping it.

        Returns:
            The final metrics (loss, step, samples_per_s, data_wait_fraction, checkpoint, ...).
        """

    @classmethod
    def resolve_eval_options(cls, options: dict[str, Any], where: str | Path = "") -> dict[str, Any]:
        """``options`` validated against ``eval_schema`` (defaults filled in); raises ``ConfigError``."""
        try:
            return validate(where or f"eval {cls.name}", cls.eval_schema, options)
        except ManifestError as exc:
            raise ConfigError(exc.file, exc.key, exc.reason) from None

    @abstractmethod
    def evaluate(self, checkpoint: Path | None, shards: list[Path], config: dict[str, Any],
                 device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The method's evaluation: distilled features (``checkpoint``) against the same
        network at random init; ``checkpoint=None`` evaluates the random init only.

        Args:
            checkpoint: a checkpoint written by ``train``.
            shards: one or more shard directories of this trainer's pipeline.
            config: the training configuration (from the checkpoint, overridable).
            device: ``"cpu"`` or ``"cuda"``.
            options: evaluation options, resolved against ``eval_schema``.
        """

    @classmethod
    def effective_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with every key that the run leaves to its size or method (``None``) filled in with the
        value the run will use.

        Why a hook: ``--show-config`` must print what a run does, not ``None``; only the trainer knows its
        sizes' defaults. What it returns must be a configuration ``--config`` accepts and that trains the same
        run. Keys that stay ``None`` (a run length given the other way, an optional file) are left out of the
        TOML with a comment. The default fills ``sync_batchnorm`` (when unset) from
        ``default_sync_batchnorm``; a trainer extends this for its own keys.

        Args:
            config: a resolved configuration (``resolve_config``).
        """
        out = copy.deepcopy(config)
        if out.get("sync_batchnorm") is None:
            out["sync_batchnorm"] = cls.default_sync_batchnorm(out)
        return out

    @classmethod
    def default_sync_batchnorm(cls, config: dict[str, Any]) -> bool:
        """Whether BatchNorm is synchronised across processes when ``sync_batchnorm`` is unset: what the method's
        release does at ``config``'s size.

        Why a hook: the one default that differs by method and size, filled by ``effective_config`` in one place
        so that a value the user set is never overwritten. The default is False (per-process BatchNorm).

        Args:
            config: a resolved configuration.
        """
        return False

    @classmethod
    def check_shards(cls, shards: Path, config: dict[str, Any]) -> None:
        """Refuse (``ConfigError``, one line) shards this configuration cannot train on, beyond the pipeline that
        built them (which the CLI checks for every trainer): for example a front end the model was not made for.

        Why a hook: the CLI calls it before the run folder is made or cleared, so a refused run leaves the disk as it
        was; ``train`` should call it too, for library use. The default accepts any shards of the right pipeline.

        Args:
            shards: the shard directory.
            config: a resolved configuration.
        """
        return None

    @classmethod
    def config_sources(cls, config: dict[str, Any]) -> dict[str, str]:
        """Where each (dotted) key's value in ``effective_config(config)`` comes from, at ``config``'s size:
        the released file and line it follows (``"valeoai/SLidR config/slidr_minkunet.yaml:12"``), or
        ``"distillkit's choice: <why>"``.

        Why a hook: a researcher comparing a run with a paper needs each number's origin next to it, and only
        the trainer knows which of its defaults follow a release. Keys not in the mapping print as
        "distillkit's default"; keys the user set print as set by the user, whatever this says.

        Args:
            config: a resolved configuration (``resolve_config``).
        """
        return {}

    def format_eval(self, result: dict[str, Any]) -> str:
        """A readable report of ``evaluate``'s result."""
        return "\n".join(f"{k}: {v}" for k, v in result.items())

    def headline(self, result: dict[str, Any]) -> dict[str, Any]:
        """The one number of ``evaluate``'s result that the demo's summary and ``summary.json`` show.

        Why a hook: each method reports its own protocol (mIoU, balanced accuracy, ...); the summary
        needs one comparable line per method without knowing their result layouts.

        Returns:
            ``{"metric": name, "distilled": float | None, "random": float | None, "gain": float | None}``
            (``distilled`` and ``gain`` are None when ``result`` holds the random init only). The default
            reads ``result["headline"]`` if the method put one there, else reports no metric.
        """
        if isinstance(result.get("headline"), dict):
            return dict(result["headline"])
        return {"metric": "none", "distilled": None, "random": None, "gain": None}


def checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The configuration stored in a checkpoint (None for checkpoints written without one): the second half
    of ``checkpoint.checkpoint_info`` (memory-mapped, see there).

    Args:
        path: the checkpoint file.
    """
    from distillkit.train.checkpoint import checkpoint_info

    return checkpoint_info(path)[1]


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
