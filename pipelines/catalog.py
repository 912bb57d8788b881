"""Manifests by path or by name: the packaged ones, and loading any of them for its pipeline.

The wheel carries ``manifests/*.toml`` as ``distillkit.manifests``: ``distillkit manifests``
lists them, ``distillkit build NAME`` takes a name where a path does not exist, and
``distillkit init NAME [OUT]`` writes a copy to edit. A plugin may point at its own packaged
manifest as ``"package:file.toml"``.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

from distillkit.pipelines.manifest import Manifest, ManifestError, read_manifest, validate_manifest
from distillkit.pipelines.registry import PluginError, get_pipeline

_KEEP_OPEN = ExitStack()  # resources of a zipped install stay extracted for the process


def packaged_manifests() -> dict[str, Path]:
    """Name (file stem) -> path of every manifest shipped in ``distillkit.manifests``."""
    root = resources.files("distillkit.manifests")
    found = {}
    for entry in root.iterdir():
        if entry.name.endswith(".toml"):
            found[entry.name[: -len(".toml")]] = Path(str(_KEEP_OPEN.enter_context(resources.as_file(entry))))
    return dict(sorted(found.items()))


def manifest_summary(path: Path) -> str:
    """The first comment line of a manifest: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_manifest(ref: str | Path) -> Path:
    """A manifest file for ``ref``: an existing path, a packaged name (``"slidr-nuscenes"``,
    with or without ``.toml``) or ``"package:file.toml"`` (a plugin's packaged manifest).

    Raises:
        ManifestError: none of these exists (the message lists the packaged names).
    """
    path = Path(ref)
    if path.is_file():
        return path
    text = str(ref)
    if ":" in text and not path.exists() and "/" not in text.split(":", 1)[0]:
        package, _, name = text.partition(":")
        try:
            entry = resources.files(package) / name
        except ModuleNotFoundError:
            entry = None
        if entry is not None and entry.is_file():
            return Path(str(_KEEP_OPEN.enter_context(resources.as_file(entry))))
    packaged = packaged_manifests()
    stem = text[: -len(".toml")] if text.endswith(".toml") else text
    if stem in packaged and "/" not in stem:
        return packaged[stem]
    raise ManifestError(ref, "", f"manifest file not found, and no packaged manifest of that name "
                                 f"(packaged: {', '.join(packaged)})")


def load_manifest(ref: str | Path, overrides: list[str] | None = None) -> Manifest:
    """Read a manifest (path or packaged name), apply ``--set`` overrides, validate it against
    its pipeline's schema and run the pipeline's cross-key checks.

    Raises:
        ManifestError: any user error, as one line ``file: key: reason``.
    """
    path = resolve_manifest(ref)
    overrides = list(overrides or [])
    data = read_manifest(path, overrides)
    name = data.get("pipeline")
    if not isinstance(name, str):
        raise ManifestError(path, "pipeline", "missing required key")
    try:
        pipeline = get_pipeline(name)
    except PluginError as exc:
        raise ManifestError(path, "pipeline", str(exc)) from None
    manifest = validate_manifest(path, data, pipeline.schema, overrides)
    pipeline.check_manifest(manifest)
    return manifest


def init_manifest(name: str, out: Path | None = None, force: bool = False) -> Path:
    """Copy the packaged manifest ``name`` to ``out`` (default ``./{name}.toml``) to edit.

    Args:
        name: a packaged manifest's name (or any manifest path).
        out: the file (or an existing folder) to write.
        force: overwrite an existing file (never a folder).

    Raises:
        ManifestError: unknown name, or ``out`` already exists and ``force`` is not set.
    """
    src = resolve_manifest(name)
    dst = Path(out) if out is not None else Path(f"{src.stem}.toml")
    if dst.is_dir():
        dst = dst / src.name
    if dst.is_dir():
        raise ManifestError(dst, "", "is a folder; not overwritten")
    if dst.exists() and not force:
        raise ManifestError(dst, "", "already exists; not overwritten (--force replaces it)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ManifestError(dst, "", "is the packaged manifest itself; choose another file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
