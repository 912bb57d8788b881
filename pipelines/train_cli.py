"""``distillkit train METHOD`` and ``distillkit eval METHOD``: options made from each trainer's schema.

Every top-level key of a trainer's configuration schema becomes an option (``batch_size`` ->
``--batch-size``), so ``distillkit train slidr --help`` lists exactly SLidR's keys with their
defaults and docs, and another method shows its own. Configuration layers, later winning:
defaults < the checkpoint's stored configuration (``--resume``; ``eval``) < ``--config FILE.toml``
< ``--set KEY=VALUE`` < explicit options.

Runs are never overwritten: without ``--out`` each run gets a new folder ``runs/METHOD/YYYYmmdd-HHMMSS``
(``train.run_dir``), and ``--out`` naming a folder that holds a run needs ``--resume`` or ``--overwrite``.
Another pipeline's shards, another method's checkpoint and (under ``torchrun``) fewer shards than ranks x
loader workers are refused in one line, exit 2 (docs/training.md, "Run folders").
"""

from __future__ import annotations

import sys
import tomllib
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from distillkit.messages import one_line
from distillkit.pipelines.manifest import Key, ManifestError

RUN_OPTIONS = ("shards", "device", "out", "resume", "overwrite", "strict", "overrides", "config_file", "show_config")


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` to stderr and exit with ``code`` (2: a user error)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Refused(Exception):
    """A user error found before training starts; its message is the one line ``fail`` prints."""


class ShardLocation(click.ParamType):
    """A shard folder on the command line: a URL (``s3://bucket/prefix``, ``https://host/path/``,
    ``file:///abs/dir``) stays a string for fsspec (``distillkit.remote``; a ``Path`` would make ``s3://`` into
    ``s3:/``), anything else is a local ``Path``, checked to be an existing directory when ``exists``.

    Args:
        exists: refuse a local path that is not an existing directory (click's own message).
    """

    name = "shards"

    def __init__(self, exists: bool = False) -> None:
        self.local = click.Path(path_type=Path, exists=exists, file_okay=not exists)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        from distillkit.remote import is_remote

        if isinstance(value, str) and is_remote(value):
            return value
        return self.local.convert(value, param, ctx)


SHARD_LOCATION = ShardLocation()
"""``verify``/``stats``/``show``'s SHARD_DIR: a missing folder is their own one-line error."""


def check_shards(trainer: Any, shard_dir: Path | str, where: str) -> None:
    """Refuse a folder that is not a finished shard build, or one built by another pipeline than the
    trainer reads (its ``index.json`` names the pipeline).

    Args:
        trainer: the trainer that will read the shards.
        shard_dir: the ``--shards`` folder, a ``Path`` or a URL.
        where: the command, for the message (``train comodo``).

    Raises:
        Refused: naming what was found and what to do.
    """
    from distillkit.pipelines.shards import BadIndex, load_index
    from distillkit.remote import RemoteError, RemoteNotFound, child

    try:
        index = load_index(shard_dir)
    except (BadIndex, RemoteError) as exc:  # already names the file (the URL) and what is wrong
        if isinstance(exc, RemoteNotFound) or (isinstance(exc, FileNotFoundError) and isinstance(shard_dir, str)):
            raise Refused(f"{exc}: no index.json at {shard_dir}: not a shard folder, or its build has not "
                          "finished (distillkit build writes index.json last)") from None
        raise Refused(str(exc)) from None
    except FileNotFoundError:
        raise Refused(f"{shard_dir}: no index.json: not a shard folder, or its build has not finished "
                      "(distillkit build writes index.json last)") from None
    except (OSError, ValueError) as exc:
        raise Refused(f"{child(shard_dir, 'index.json')}: unreadable ({exc})") from None
    built = index.get("pipeline") if isinstance(index, dict) else None
    if isinstance(built, str) and built != trainer.pipeline:
        readers = _methods(lambda t: t.pipeline == built)
        hint = f" (train {' / '.join(readers)} reads these)" if readers else ""
        raise Refused(f"{shard_dir} were built by the {built} pipeline; {where} reads {trainer.pipeline} "
                      f"shards{hint}")


def check_weight_files(config: dict[str, Any], where: str) -> None:
    """Refuse a weights file the configuration names (``teacher_checkpoint``, ``student_checkpoint``,
    ``init_checkpoint``: every key ending in ``checkpoint``) that is no readable torch file: empty, truncated,
    text, a foreign zip. Only its first bytes and zip directory are read (``checkpoint_file.torch_file_format``),
    so this costs nothing at any size; the trainer still loads and (for distillkit's own files) verifies it.
    Checked here, before the run folder is created or cleared, so a refused command leaves the disk as it was.

    A folder (a Hugging Face ``save_pretrained`` folder) and a ``.safetensors`` file are left to their loader.

    Args:
        config: the effective configuration.
        where: the command, for the message (``train slidr``).

    Raises:
        Refused: naming the key, the file and what is wrong.
    """
    from distillkit.checkpoint_file import CheckpointError, torch_file_format

    for key, value in config.items():
        if not key.endswith("checkpoint") or not isinstance(value, (str, Path)) or not str(value):
            continue
        path = Path(value)
        if path.is_file() and path.suffix != ".safetensors":
            try:
                torch_file_format(path)
            except CheckpointError as exc:
                raise Refused(f"{where}: {key}: {exc}") from None


def _methods(accepts: Any) -> list[str]:
    """The registered methods whose trainer ``accepts(trainer)``; a plugin that fails to load is left out."""
    from distillkit.train.registry import TRAINERS, get_trainer

    found = []
    for other in TRAINERS.names():
        try:
            if accepts(get_trainer(other)):
                found.append(other)
        except Exception:  # noqa: BLE001 - a broken plugin (or a config it rejects) just does not match
            continue
    return found


def checkpoint_of(trainer: Any, path: Path, where: str) -> dict[str, Any] | None:
    """The training configuration stored in ``path``, after making sure it is a checkpoint of ``trainer``'s
    method: by the method name new checkpoints store, else (older checkpoints) by which method's
    configuration schema accepts the stored configuration.

    Args:
        trainer: the trainer of the command.
        path: the checkpoint.
        where: the command, for the message (``eval audio``).

    Returns:
        The stored configuration; None for a checkpoint that holds none (it cannot be recognised).

    Raises:
        Refused: an unreadable, foreign or corrupted file (its digest is verified here, before anything is
            done with it), another method's checkpoint.
    """
    from distillkit.train.base import ConfigError
    from distillkit.train.checkpoint import CheckpointError, checkpoint_info

    try:
        method, config = checkpoint_info(path)
    except CheckpointError as exc:  # already one line naming the file and what is wrong
        raise Refused(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - anything else torch.load may raise
        raise Refused(f"{path}: not a readable checkpoint ({one_line(exc)})") from None
    if method is None and config is not None:
        try:
            trainer.resolve_config(config, where=where)
        except ConfigError as exc:
            others = _methods(lambda t: t.name != trainer.name and t.resolve_config(config) is not None)
            if not others:
                raise Refused(f"{path}: its stored configuration is not one {where} accepts ({exc}): is it a "
                              f"checkpoint of {trainer.name}?") from None
            method = others[0]
    if method is not None and method != trainer.name:
        raise Refused(f"{path} was written by train {method}; {where} reads {trainer.name} checkpoints "
                      f"(distillkit eval {method} reads it)")
    return config


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
    """The ``--config`` file's keys; raises ``Refused`` (not ``fail``: under torchrun rank 0 reads it, and
    every rank must stop on the error alike)."""
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise Refused(f"{path}: cannot read configuration: {exc}") from None


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
        click.Option(["--shards"], type=ShardLocation(exists=True),
                     help=f"a {trainer.pipeline} shard directory, or a URL of one (s3://bucket/prefix, "
                          "https://host/path/, file:///dir) [required, except with --show-config]"),
        click.Option(["--device"], default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True),
        click.Option(["--out"], default=None, type=click.Path(path_type=Path, file_okay=False),
                     help=f"run folder: latest.pt, log.jsonl, curves.png [default: a new runs/{name}/"
                          "YYYYmmdd-HHMMSS]; one that holds a run needs --resume or --overwrite"),
        click.Option(["--resume"], is_flag=True,
                     help=f"continue from OUT/latest.pt with its stored configuration (without --out: the newest "
                          f"run under runs/{name})"),
        click.Option(["--overwrite"], is_flag=True,
                     help="start afresh in an --out that holds a run: its latest.pt, log.jsonl, curves.png are "
                          "removed first"),
        click.Option(["--strict"], is_flag=True, help="stop at the first bad sample instead of skipping it"),
        click.Option(["--show-config"], is_flag=True,
                     help="print the fully resolved configuration as TOML (which --config accepts), each key "
                          "commented with where its value comes from, and exit without training"),
        *_config_params(trainer.config_schema(), "set a configuration key", "a TOML file of configuration keys"),
    ]

    def run(**kw: Any) -> None:
        from distillkit.train import distributed
        from distillkit.train.checkpoint import CheckpointError
        from distillkit.train.loop import format_metrics
        from distillkit.train.streaming import BadSample, CorruptShard, DuplicateShards, TooFewShards

        if kw["show_config"]:
            show_config(trainer, kw)
            return
        if kw["shards"] is None:
            raise click.UsageError("Missing option '--shards'.")
        _device_ok(kw["device"])
        try:
            ranks = distributed.join(kw["device"])  # under torchrun: one process per GPU (train/distributed.py)
        except RuntimeError as exc:
            fail(str(exc))
        if not ranks.main:  # start-up and progress messages once, from rank 0; warnings still come from every rank
            import logging

            logging.getLogger("distillkit").setLevel(logging.WARNING)
        # Rank 0 alone reads OUT, resolves the configuration and creates the run folder; the others follow its
        # answer, so that every rank trains into the same folder, or every rank stops on the same error.
        # ``held`` keeps rank 0's lock on the run folder (RUN_LOCK) until the run ends, however it ends.
        with ExitStack() as held:
            plan = _plan_train(trainer, kw, ranks.world_size, held) if ranks.main else None
            if isinstance(plan, str):  # printed before the others learn of it: none can exit (and have us killed) first
                click.echo(f"error: {plan}", err=True)
            plan = distributed.from_rank0(plan)
            if isinstance(plan, str):
                _stop_everywhere()
            out, config = plan
            if ranks.main:
                click.echo(f"run folder: {out}")
            try:
                # Trainer.train names the run (checkpoint.training_as): eval/--resume refuse another method's
                # checkpoints by that name.
                metrics = trainer.train(kw["shards"], out, config, device=kw["device"], resume=kw["resume"],
                                        strict=kw["strict"])
            except (distributed.ProcessCountMismatch, TooFewShards, DuplicateShards,
                    CheckpointError) as exc:  # alike on every rank
                # (CheckpointError: the resumed checkpoint or a teacher/student/init weights file, which every rank
                # reads, is corrupted or unreadable; one line naming it)
                if ranks.main:
                    click.echo(f"error: {exc}", err=True)
                _stop_everywhere()
            except BadSample as exc:  # --strict: raised on the rank that read the sample, the others are not told
                # Exit 1, not 2: the command was right and the run had started; the data stopped it (as a build
                # over output.max_rejected exits 1). No barrier: torchrun stops the other ranks.
                click.echo(f"error: --strict: {bad_sample_reason(exc)} (without --strict a bad sample is skipped, "
                           "logged and counted)", err=True)
                sys.exit(1)
            except CorruptShard as exc:  # found by the rank (or loader worker) that read the shard: exit 1 as above
                click.echo(f"error: {bad_sample_reason(exc)} (--set on_corrupt_shard=skip goes on, counting it)",
                           err=True)
                sys.exit(1)
            distributed.leave()  # not on an exception: torchrun stops the other ranks, a barrier would wait for them
        if ranks.main:
            click.echo(format_metrics(metrics))

    return click.Command(
        name, params=params, callback=run,
        help=f"{trainer.summary or 'Train ' + name}. Reads {trainer.pipeline} shards.",
        context_settings={"show_default": True},
    )


def show_config(trainer: Any, kw: dict[str, Any]) -> None:
    """Print ``train METHOD --show-config``: the configuration the options resolve to (``train.config_toml``), the
    keys the user set named by how they were set. A value that cannot be read (unknown key, wrong type) is a
    one-line error, exit 2. A configuration that reads but that a run would refuse (``check_config``: e.g. the
    paper size without its teacher) is still printed, with the refusal as its first comment, and then the same
    one-line error and exit 2 as the run would give: the user sees the recipe and what it still needs.

    Args:
        trainer: the trainer class.
        kw: the command's parsed options.
    """
    from distillkit.train.base import ConfigError
    from distillkit.train.config_toml import flatten, render_config

    try:
        file_layer = _read_config_file(kw["config_file"])
        explicit = {k: v for k, v in kw.items() if k not in RUN_OPTIONS and v is not None}
        config = trainer.resolve_config(file_layer, explicit, overrides=list(kw["overrides"]), check=False)
    except (ConfigError, ManifestError, Refused) as exc:
        fail(str(exc))
    refused = None
    try:
        trainer.check_config(config, f"train {trainer.name}")
    except ConfigError as exc:
        refused = str(exc)
    user = {k: f"--config {kw['config_file']}" for k in flatten(file_layer)}
    user |= {text.partition("=")[0].strip(): "--set" for text in kw["overrides"]}
    user |= {k: "--" + k.replace("_", "-") for k in explicit}
    if refused:
        click.echo(f"# note: a run with this configuration is refused: {refused}")
    click.echo(render_config(trainer, config, user), nl=False)
    if refused:
        fail(refused)


def bad_sample_reason(exc: BaseException) -> str:
    """The one line of a data error (``BadSample``: shard, sample key, reason; ``CorruptShard``: the shard), also
    when a DataLoader worker raised it: torch re-raises it in the main process with the worker's whole traceback
    as its message.

    Args:
        exc: the error the training loop raised.
    """
    return one_line(exc)


def _stop_everywhere() -> None:
    """Exit 2 on an error every rank knows of, after rank 0 printed it: the ranks leave the process group
    together (each reaches the barrier, as each saw the error), so none is left waiting and none is killed
    by torchrun before rank 0's line is out."""
    from distillkit.train import distributed

    distributed.leave()
    sys.exit(2)


RUN_LOCK = ".lock"
"""The lock file rank 0 holds in the run folder for the whole run (``distillkit.folder_lock``)."""


def _lock_run(out: Path, held: ExitStack) -> bool:
    """Lock the run folder ``out`` until ``held`` closes, creating the folder if missing. Returns whether this
    call created it (a refused command removes it again).

    Raises:
        Refused: another process writes ``out``, or ``out`` cannot be created or locked.
    """
    from distillkit.folder_lock import FolderBusy, folder_lock

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        held.enter_context(folder_lock(out, RUN_LOCK, what="run"))
    except FolderBusy:
        raise Refused(f"{out}: another run is writing this folder (lock {out / RUN_LOCK}); wait for it to end, or "
                      "give another --out") from None
    except OSError as exc:
        raise Refused(f"{out}: cannot use as run folder: {exc.strerror or exc}") from None
    return created


def _plan_train(trainer: Any, kw: dict[str, Any], world_size: int,
                held: ExitStack) -> tuple[Path, dict[str, Any]] | str:
    """Rank 0's decisions before training: the run folder and the configuration, or the one-line error.

    The run folder is locked first (``held`` keeps the lock for the run): two processes given one ``--out``,
    or a ``--resume`` of a run still going, must not both pass the checks below and then write one log and one
    checkpoint. The checks run next and the folder is changed (created, or cleared by ``--overwrite``) only when
    all of them pass, so a refused command leaves the disk as it was (a folder created for the lock is removed).
    """
    from distillkit.train.base import ConfigError
    from distillkit.train.checkpoint import CHECKPOINT_NAME
    from distillkit.train.run_dir import RUNS_ROOT, clear_run, holds_run, new_run_dir, newest_run
    from distillkit.train.run_log import LOG_NAME
    from distillkit.train.streaming import TooFewShards, check_shard_count

    name, out, resume, overwrite = trainer.name, kw["out"], kw["resume"], kw["overwrite"]
    created = False
    try:
        if resume and overwrite:
            raise Refused("--resume continues the run in --out and --overwrite replaces it: give one of them")
        if overwrite and out is None:
            raise Refused("--overwrite needs --out (without --out every run gets a new folder)")
        if resume and out is None:
            out = newest_run(name)
            if out is None:
                raise Refused(f"--resume without --out continues the newest run under {RUNS_ROOT / name}, and "
                              "there is none: name the run folder with --out")
            click.echo(f"note: --resume: continuing the newest run of {name}, {out}", err=True)
        if out is not None:
            created = _lock_run(out, held)
        stored: dict[str, Any] = {}
        if resume and (out / CHECKPOINT_NAME).is_file():
            stored = checkpoint_of(trainer, out / CHECKPOINT_NAME, f"train {name} --resume") or {}
        try:
            config = trainer.resolve_config(stored, _read_config_file(kw["config_file"]), {},
                                            overrides=list(kw["overrides"]))
            explicit = {k: v for k, v in kw.items() if k not in RUN_OPTIONS and v is not None}
            config = trainer.resolve_config(config, explicit)
        except (ConfigError, ManifestError) as exc:
            raise Refused(str(exc)) from None
        check_shards(trainer, kw["shards"], f"train {name}")
        try:
            trainer.check_shards(kw["shards"], config)
        except ConfigError as exc:
            raise Refused(str(exc)) from None
        check_weight_files(trainer.effective_config(config), f"train {name}")
        global_batch = trainer.effective_config(config).get("batch_size")
        if isinstance(global_batch, int) and global_batch % world_size:
            raise Refused(f"train {name}: batch_size: {global_batch} is the global batch and must divide across the "
                          f"{world_size} processes: give a multiple of {world_size}")
        if out is not None and not (resume or overwrite) and (found := holds_run(out)):
            raise Refused(f"{out} already holds a run ({', '.join(found)}): --resume continues it, --overwrite "
                          f"replaces it, and without --out the run gets a new folder under {RUNS_ROOT / name}")
        try:
            check_shard_count(kw["shards"], world_size, int(config.get("num_workers") or 0))
        except TooFewShards as exc:
            raise Refused(str(exc)) from None
        if out is None:
            try:
                out = new_run_dir(name)
            except OSError as exc:  # e.g. a file named "runs" here: one line, and every rank stops on it
                raise Refused(f"cannot create a run folder under {RUNS_ROOT / name}: {exc.strerror or exc} "
                              f"({exc.filename or RUNS_ROOT}); give --out") from None
            _lock_run(out, held)
        elif overwrite and (removed := clear_run(out)):
            click.echo(f"note: --overwrite: removed the previous run's {', '.join(removed)} from {out}", err=True)
        elif resume and not (out / CHECKPOINT_NAME).is_file():
            # A job script may pass --resume from its first start on. A log without a checkpoint is a run that
            # stopped before its first checkpoint: all of it is trained again, so none of its lines may stay.
            again = (out / LOG_NAME).is_file()
            clear_run(out)
            click.echo(f"note: --resume: {out} has no {CHECKPOINT_NAME} yet, so " +
                       ("its run starts again from step 0" if again else "a new run starts there"), err=True)
    except (Refused, OSError) as exc:
        held.close()  # the lock goes with the refusal
        if created:  # the folder existed only for the lock: leave the disk as it was
            (out / RUN_LOCK).unlink(missing_ok=True)
            try:
                out.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):  # clear_run failed (a read-only folder, a file that cannot go)
            return f"{out}: cannot prepare the run folder: {exc.strerror or exc}"
        return str(exc)
    return out, config


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
        click.Option(["--shards"], required=True, multiple=True, type=ShardLocation(exists=True),
                     help=f"{trainer.pipeline} shard directory or URL (repeatable: e.g. a train and a val build)"),
        click.Option(["--device"], default="cpu", type=click.Choice(["cpu", "cuda"]), show_default=True),
        *_config_params(trainer.eval_schema, "override a key of the checkpoint's stored training configuration",
                        "a TOML file of training configuration keys"),
    ]

    def run(**kw: Any) -> None:
        from distillkit.train.base import ConfigError
        from distillkit.train.checkpoint import CheckpointError
        from distillkit.train.streaming import CorruptShard, DuplicateShards

        try:
            stored = checkpoint_of(trainer, kw["checkpoint"], f"eval {name}")
            for shard_dir in kw["shards"]:
                check_shards(trainer, shard_dir, f"eval {name}")
        except Refused as exc:
            fail(str(exc))
        if stored is None:
            click.echo(f"note: {kw['checkpoint']} holds no configuration (an older checkpoint): using the "
                       "defaults and --set", err=True)
        options = {k: v for k, v in kw.items() if k in trainer.eval_schema and v is not None}
        try:
            config = trainer.resolve_config(stored or {}, _read_config_file(kw["config_file"]),
                                            overrides=list(kw["overrides"]), where=f"eval {name}")
            options = trainer.resolve_eval_options(options)
        except (ConfigError, ManifestError, Refused) as exc:
            fail(str(exc))
        _device_ok(kw["device"])
        try:
            result = trainer.evaluate(kw["checkpoint"], list(kw["shards"]), config, device=kw["device"],
                                      options=options)
        except (ConfigError, CheckpointError) as exc:  # shards the protocol cannot use (e.g. SLidR's probe without
            fail(str(exc))  # val scenes); a weights file it loads (a student, an init checkpoint) unreadable
        except (CorruptShard, DuplicateShards) as exc:  # the data stopped it: exit 1, as train
            fail(bad_sample_reason(exc), code=1)
        click.echo(trainer.format_eval(result))

    return click.Command(name, params=params, callback=run, context_settings={"show_default": True},
                         help=f"Evaluate a {name} checkpoint: distilled features against the same network at "
                              "random init.")


class EvalGroup(TrainGroup):
    """``distillkit eval METHOD``: one subcommand per registered trainer, built on demand."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return make_eval_command(cmd_name)
