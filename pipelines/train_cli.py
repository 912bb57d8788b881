"""``distillkit train METHOD`` and ``distillkit eval METHOD``: options made from each trainer's schema.

Every top-level key of a trainer's configuration schema becomes an option (``batch_size`` ->
``--batch-size``), so ``distillkit train slidr --help`` lists exactly SLidR's keys with their
defaults and docs, and another method shows its own. Configuration layers, later winning:
defaults < the checkpoint's stored configuration (``--resume``; ``eval``) < ``--config FILE.toml``
< ``--set KEY=VALUE`` < explicit options.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from distillkit.pipelines.manifest import Key, ManifestError

RUN_OPTIONS = ("shards", "device", "out", "resume", "strict", "overrides", "config_file")


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` to stderr and exit with ``code`` (2: a user error)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _trainer(name: str) -> Any:
    from distillkit.pipelines.registry import PluginError
    from distillkit.train.registry import get_trainer

    try:
        return get_trainer(name)
    except PluginError as exc:
        fail(str(exc))


def _key_option(name: str, key: Key) -> click.Option:
    flag = "--" + name.replace("_", "-")
    help_text = f"{key.doc} [default: {key.default}]" if key.doc else f"[default: {key.default}]"
    if key.kind is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text)
    if key.choices is not None:
        kind: Any = click.Choice([str(c) for c in key.choices])
    elif key.kind in ("path", "existing_path"):
        kind = click.Path()
    elif key.kind in (int, float, str):
        kind = key.kind
    else:  # lists and tables: only through --set / --config
        return None  # type: ignore[return-value]
    return click.Option([flag, name], type=kind, default=None, help=help_text)


def _read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        fail(f"{path}: cannot read configuration: {exc}")
    return {}


def _config_params(schema: dict[str, Any], set_help: str, config_help: str) -> list[click.Parameter]:
    """``--set``, ``--config`` and one option per top-level key of ``schema``."""
    params: list[click.Parameter] = [
        click.Option(["--set", "overrides"], multiple=True, metavar="KEY=VALUE", help=set_help),
        click.Option(["--config", "config_file"], type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     help=config_help),
    ]
    for key_name, key in schema.items():
        if isinstance(key, Key) and (opt := _key_option(key_name, key)) is not None:
            params.append(opt)
    return params


def _device_ok(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda but no CUDA device is available")


def make_train_command(name: str) -> click.Command:
    """The ``train NAME`` subcommand, its options read from the trainer's schema."""
    trainer = _trainer(name)
    params: list[click.Parameter] = [
        click.Option(["--shards"], required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
                     help=f"a {trainer.pipeline} shard directory"),
        click.Option(["--device"], default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True),
        click.Option(["--out"], default=Path("runs/train"), type=click.Path(path_type=Path), show_default=True,
                     help="run directory: latest.pt, log.jsonl, curves.png"),
        click.Option(["--resume"], is_flag=True, help="continue from OUT/latest.pt with its stored configuration"),
        click.Option(["--strict"], is_flag=True, help="stop at the first bad sample instead of skipping it"),
        *_config_params(trainer.config_schema(), "set a configuration key", "a TOML file of configuration keys"),
    ]

    def run(**kw: Any) -> None:
        from distillkit.train.base import ConfigError, checkpoint_config
        from distillkit.train.loop import format_metrics

        explicit = {k: v for k, v in kw.items() if k not in RUN_OPTIONS and v is not None}
        stored: dict[str, Any] = {}
        ckpt = kw["out"] / "latest.pt"
        if kw["resume"] and ckpt.is_file():
            stored = checkpoint_config(ckpt) or {}
        try:
            config = trainer.resolve_config(stored, _read_config_file(kw["config_file"]), {},
                                            overrides=list(kw["overrides"]))
            config = trainer.resolve_config(config, explicit)
        except (ConfigError, ManifestError) as exc:
            fail(str(exc))
        _device_ok(kw["device"])
        from distillkit.train import distributed

        ranks = distributed.join(kw["device"])  # under torchrun: one process per GPU (train/distributed.py)
        try:
            metrics = trainer.train(kw["shards"], kw["out"], config, device=kw["device"], resume=kw["resume"],
                                    strict=kw["strict"])
        except distributed.ProcessCountMismatch as exc:
            fail(str(exc))
        distributed.leave()  # not on an exception: torchrun stops the other ranks, a barrier would wait for them
        if ranks.main:
            click.echo(format_metrics(metrics))

    return click.Command(
        name, params=params, callback=run,
        help=f"{trainer.summary or 'Train ' + name}. Reads {trainer.pipeline} shards.",
        context_settings={"show_default": True},
    )


class TrainGroup(click.Group):
    """``distillkit train METHOD``: one subcommand per registered trainer, built on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from distillkit.train.registry import TRAINERS

        return TRAINERS.names()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return make_train_command(cmd_name)


def make_eval_command(name: str) -> click.Command:
    """The ``eval NAME`` subcommand: the training configuration comes from the checkpoint
    (overridable with ``--set``/``--config``), its own options from the trainer's ``eval_schema``."""
    trainer = _trainer(name)
    params: list[click.Parameter] = [
        click.Option(["--checkpoint"], required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False)),
        click.Option(["--shards"], required=True, multiple=True,
                     type=click.Path(path_type=Path, exists=True, file_okay=False),
                     help=f"{trainer.pipeline} shard directory (repeatable: e.g. a train and a val build)"),
        click.Option(["--device"], default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True),
        *_config_params(trainer.eval_schema, "override a key of the checkpoint's stored training configuration",
                        "a TOML file of training configuration keys"),
    ]

    def run(**kw: Any) -> None:
        from distillkit.train.base import ConfigError, checkpoint_config

        stored = checkpoint_config(kw["checkpoint"])
        if stored is None:
            click.echo(f"note: {kw['checkpoint']} holds no configuration (an older checkpoint): using the "
                       "defaults and --set", err=True)
        options = {k: v for k, v in kw.items() if k in trainer.eval_schema and v is not None}
        try:
            config = trainer.resolve_config(stored or {}, _read_config_file(kw["config_file"]),
                                            overrides=list(kw["overrides"]), where=f"eval {name}")
            options = trainer.resolve_eval_options(options)
        except (ConfigError, ManifestError) as exc:
            fail(str(exc))
        _device_ok(kw["device"])
        result = trainer.evaluate(kw["checkpoint"], list(kw["shards"]), config, device=kw["device"], options=options)
        click.echo(trainer.format_eval(result))

    return click.Command(name, params=params, callback=run, context_settings={"show_default": True},
                         help=f"Evaluate a {name} checkpoint: distilled features against the same network at "
                              "random init.")


class EvalGroup(TrainGroup):
    """``distillkit eval METHOD``: one subcommand per registered trainer, built on demand."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return make_eval_command(cmd_name)
