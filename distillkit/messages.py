"""Exceptions as one-line messages, for errors that end a command with one line (exit 2) instead of a traceback.

Here, below ``distillkit.pipelines`` and ``distillkit.train`` (which both use it; pipelines must not import train),
and free of heavy imports so that the CLI stays cheap to start.
"""

from __future__ import annotations

_LONG = 160
"""Characters past which a quoted library message is cut after its first sentence (``with_type``)."""


def one_line(exc: BaseException, with_type: bool = False) -> str:
    """An exception's message as one line: its first non-blank line, or its type's name when it has no message.

    When a DataLoader worker raised it, torch re-raises it in the main process with the worker's whole traceback
    as its message: then the last line, the original message, without its ``TypeName: `` prefix.

    Args:
        exc: the exception.
        with_type: for a library's error quoted inside ours (``torch.load failed (RuntimeError: ...)``): prefix
            the type's name, and cut a long line after its first sentence (torch appends advice to the line).
    """
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if "Original Traceback" in text:
        line = lines[-1].partition(f"{type(exc).__name__}: ")[2] or lines[-1]
    if not with_type:
        return line
    if len(line) > _LONG and ". " in line:
        line = line[: line.index(". ") + 1]
    return f"{type(exc).__name__}: {line}"
