"""Input files under a source folder: which ones to build, which to reject with a reason, and their names.

Every pipeline with a folder source (uniseg, audio, comodo) lists its inputs here, so that one odd entry never
stops a build nor disappears without a word (docs/reliability.md):

- **Names that are not valid UTF-8** (files copied from other systems: ``caf\\xe9.wav`` in Latin-1) are listed
  like any other. Python hands them over as ``str`` with the undecodable bytes as lone surrogates (PEP 383,
  ``os.fsdecode``), which every ``os`` and ``open`` call accepts; only encoding such a string as UTF-8 fails.
  So paths to open keep that form, and whatever is *shown* or *written* (sources in ``index.json``, reasons,
  ``meta.json``) goes through :func:`printable`, which writes each undecodable byte as ``\\xNN``.
- **Sample keys** (:func:`shard_key`): the usual sanitised name (``[A-Za-z0-9_-]``, other characters as ``_``)
  where that is a valid key; for a name that is not valid UTF-8 (or whose sanitised form is empty or starts
  with ``_``, which ``pipelines.shards.check_key`` refuses) the percent-encoding of the name's raw bytes
  (:func:`escaped_key`: ``caf\\xe9`` -> ``caf%E9``). That key gives back the exact bytes
  (``urllib.parse.unquote_to_bytes``), is the same on every run, and never equals a sanitised key, which
  holds no ``%``.
- **Entries named like an input that cannot be one** are returned as :class:`Unusable`, each with its reason,
  for the plan to list as rejected: a folder (``x.wav/``), a symlink loop or a broken symlink, a FIFO, socket
  or device, a file this process may not read, a folder that cannot be listed. Readability is checked here,
  at plan time, because ``chmod`` does not change a file's mtime: a file rejected while building for want of
  permission would keep its rejection on a rerun after the fix (the runner reuses a shard whose inputs kept
  their sizes and mtimes), while a plan that now includes it changes the shard's plan and rebuilds it.
- **Symlinks to folders are followed** (datasets are often assembled from links), each real folder at most
  once. Real folders are walked first, then the folders reached through one link, then through two, and so on
  (links in the order of their paths): a folder reached both by its own path and through a link keeps its own
  path, so adding a convenience link (``a/latest -> ../b/run3``) never re-keys samples; the link is rejected as a
  duplicate instead of building every file twice. A link to one of its own ancestors (``up -> ..``) is a loop
  and is rejected, and so is any entry whose link cannot be followed (a loop such as ``la -> lb -> la``, a link
  through a folder this process cannot enter), whatever its name: it might hide a folder of inputs.

The order is that of the raw bytes of the relative paths, which for UTF-8 names is the order of the ``str`` paths
(UTF-8 preserves code-point order). Compared with the ``Path.rglob`` listing the pipelines used before, the files a
plan builds and their keys are the same for trees of valid names without symlinked folders, except that a file this
process may not read is now rejected while planning (it was rejected while building) and an audio file named only
by its suffix (``.wav``) is now built. Python 3.11's ``rglob`` did not enter symlinked folders: files under one
that is not otherwise reached are now built, under the link's path. Entries it skipped in silence (folders named
like inputs, loops, broken links) are now rejected with their reason.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_SURROGATE = re.compile("[\ud800-\udfff]")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_KEEP_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def printable(text: str | os.PathLike[str]) -> str:
    """``text`` with each byte that was not valid UTF-8 (a PEP 383 surrogate) written as ``\\xNN``: a string that
    prints and encodes as UTF-8 and still shows the name's raw bytes. Valid text is returned unchanged.

    Args:
        text: a name, a path or a message that may hold such a name.
    """
    text = os.fspath(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass

    def one(match: re.Match[str]) -> str:
        code = ord(match.group())
        # U+DC80..U+DCFF is how Python decodes an undecodable byte 0x80..0xFF; other lone surrogates as \uXXXX
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATE.sub(one, text)


def escaped_key(name: str) -> str:
    """The percent-encoding of ``name``'s raw bytes: every byte outside ``[A-Za-z0-9_-]``, and a leading ``_``,
    as ``%XX`` (upper-case hex). Reversible (``urllib.parse.unquote_to_bytes`` gives the bytes back) and dot-free.

    Args:
        name: a name as Python lists it (``os.fsdecode`` of its bytes).
    """
    raw = os.fsencode(name)
    return "".join(chr(b) if b in _KEEP_BYTES and not (i == 0 and b == ord("_")) else f"%{b:02X}"
                   for i, b in enumerate(raw))


def shard_key(name: str) -> str:
    """A sample key for ``name`` (a relative path, or the part of it a pipeline keys on): characters outside
    ``[A-Za-z0-9_-]`` as ``_`` (``a/b c`` -> ``a_b_c``) where the name is valid UTF-8 and that gives a valid
    key (not empty, no leading ``_``), else :func:`escaped_key`. The two forms never collide (only the second
    holds ``%``).

    Args:
        name: the name to key (PEP 383 ``str``).
    """
    if not _SURROGATE.search(name):
        key = _KEY_CHARS.sub("_", name)
        if key and not key.startswith("_"):
            return key
    return escaped_key(name)


def sort_key(rel: str) -> bytes:
    """The order of listed paths: their raw bytes (a total order, even for names that are not UTF-8).

    Args:
        rel: a relative path as listed.
    """
    return os.fsencode(rel)


@dataclass(frozen=True)
class Found:
    """An input file: ``rel`` relative to the root (POSIX, PEP 383 ``str``) and ``path`` to open."""

    rel: str
    path: str

    @property
    def shown(self) -> str:
        """``rel`` as it may be printed and written (:func:`printable`)."""
        return printable(self.rel)


@dataclass(frozen=True)
class Unusable:
    """An entry named like an input that cannot be read as one: ``rel`` as listed and the reason."""

    rel: str
    reason: str

    def rejection(self, stage: str = "plan") -> dict[str, str]:
        """The runner's ``{source, stage, reason}`` of this entry, printable.

        Args:
            stage: the stage that rejects it.
        """
        return {"source": printable(self.rel), "stage": stage, "reason": printable(self.reason)}


@dataclass
class Listing:
    """What :func:`list_inputs` found: ``files`` to build and ``unusable`` entries, each sorted by raw path."""

    files: list[Found] = field(default_factory=list)
    unusable: list[Unusable] = field(default_factory=list)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _stat_problem(path: str, exc: OSError) -> str:
    """Why following ``path`` failed, in words naming it."""
    if exc.errno == errno.ELOOP:
        return f"{printable(path)}: symlink loop (the link never reaches a file)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"{printable(path)}: broken symlink to {printable(target)} (no such file)"
    if exc.errno == errno.EACCES:  # stat of an entry of a listable folder: a link through a folder we may not enter
        return f"{printable(path)}: cannot enter a folder the link leads through (permission denied)"
    return f"{printable(path)}: cannot be read ({exc.strerror or exc})"


def _claim(ident: tuple[int, int], path: str, rel: str, ancestors: frozenset[tuple[int, int]],
           seen: dict[tuple[int, int], str], out: Listing) -> bool:
    """Whether the folder ``ident`` reached by ``path`` is to be listed there: True the first time; a loop or a
    second path to it is rejected (into ``out``) with the path it is listed by."""
    if ident in ancestors:
        out.unusable.append(Unusable(rel, f"{printable(path)}: symlink loop (it points to "
                                          f"{printable(seen[ident])}, a folder that contains it)"))
    elif ident in seen:
        out.unusable.append(Unusable(rel, f"{printable(path)}: the same folder as "
                                          f"{printable(seen[ident])}, whose files are listed there"))
    else:
        seen[ident] = path
        return True
    return False


def list_inputs(root: Path | str, suffixes: Iterable[str], recursive: bool = True,
                exclude: Iterable[str] = ()) -> Listing:
    """Every entry under ``root`` whose name ends in one of ``suffixes`` (case-insensitive): usable files, and
    the unusable ones with their reason (module docstring).

    Args:
        root: the folder to list (a missing folder lists as empty: the caller says what it needed).
        suffixes: name endings that make an input (``.wav``), any case.
        recursive: list sub-folders too (following symlinks to folders, each folder once).
        exclude: name endings that are never inputs although they end in a suffix (``.inst.png``).

    Raises:
        OSError: ``root`` itself exists but cannot be listed (not a folder, no permission): the source is wrong,
            which the caller reports as such rather than as one rejected input.
    """
    root_s = os.fspath(Path(root))  # normalised as Path joins print it: paths as the plans always wrote them
    ends = tuple(s.lower() for s in suffixes)
    skip = tuple(s.lower() for s in exclude)
    out = Listing()
    try:
        st = os.stat(root_s)
    except FileNotFoundError:
        return out
    seen: dict[tuple[int, int], str] = {(st.st_dev, st.st_ino): root_s}  # folder -> the path it is listed by
    # (folder path, its rel, the (dev, ino) of it and its ancestors): iterative, so deep trees need no recursion.
    # One layer at a time (module docstring): ``todo`` holds the folders of this layer, ``links`` the links to
    # folders met while walking it, followed once the whole layer is walked.
    todo: list[tuple[str, str, frozenset[tuple[int, int]]]] = [(root_s, "", frozenset(seen))]
    links: list[tuple[str, str, tuple[int, int], frozenset[tuple[int, int]]]] = []
    while todo:
        folder, prefix, ancestors = todo.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            if not prefix:
                raise
            out.unusable.append(Unusable(prefix, f"{printable(folder)}: cannot list the folder "
                                                 f"({exc.strerror or exc})"))
            entries = []
        subfolders = []
        for entry in entries:
            rel, lower = _join(prefix, entry.name), entry.name.lower()
            wanted = lower.endswith(ends) and not (skip and lower.endswith(skip))
            if not wanted:
                if not recursive:
                    continue
                try:
                    if not entry.is_dir():  # follows a link; False for a broken one
                        continue  # another kind of file (or a link to one): not ours, and no stat spent on it
                except OSError as exc:
                    # a link that cannot be followed (a loop, a folder on its way we may not enter): it may stand
                    # for a folder of inputs, so it is said, not skipped (and one entry never stops the listing)
                    out.unusable.append(Unusable(rel, _stat_problem(entry.path, exc)))
                    continue
            try:
                st = entry.stat()  # follows symlinks
            except OSError as exc:
                if wanted:
                    out.unusable.append(Unusable(rel, _stat_problem(entry.path, exc)))
                continue  # a broken link under another name is no input: nothing to say
            if stat.S_ISDIR(st.st_mode):
                if wanted:
                    out.unusable.append(Unusable(rel, f"{printable(entry.path)}: a folder named like an input "
                                                      f"file, not a file"))
                if recursive:
                    ident = (st.st_dev, st.st_ino)
                    if entry.is_symlink():
                        links.append((entry.path, rel, ident, ancestors))  # followed after this layer
                    else:
                        subfolders.append((entry.path, rel, ident))
            elif wanted and stat.S_ISREG(st.st_mode):
                if os.access(entry.path, os.R_OK):
                    out.files.append(Found(rel, entry.path))
                else:
                    out.unusable.append(Unusable(rel, f"{printable(entry.path)}: cannot be read "
                                                      f"(permission denied)"))
            elif wanted:
                out.unusable.append(Unusable(rel, f"{printable(entry.path)}: not a regular file (a FIFO, socket "
                                                  f"or device)"))
        for path, rel, ident in reversed(subfolders):  # popped in name order
            if _claim(ident, path, rel, ancestors, seen, out):  # a second real path: a bind mount
                todo.append((path, rel, ancestors | {ident}))
        if not todo:  # this layer is walked: the links met in it open the next one, claimed in path order
            for path, rel, ident, above in sorted(links, key=lambda t: sort_key(t[1])):
                if _claim(ident, path, rel, above, seen, out):
                    todo.append((path, rel, above | {ident}))
            todo.reverse()
            links = []
    out.files.sort(key=lambda f: sort_key(f.rel))
    out.unusable.sort(key=lambda u: sort_key(u.rel))
    return out
