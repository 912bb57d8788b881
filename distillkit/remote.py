"""Shard folders beyond the local disk: ``s3://``, ``http(s)://``, ``file://`` (and any fsspec protocol) through fsspec.

One place for what a remote location is, how it is opened, how transient failures are retried and how failures read
as one line, so the readers (``distillkit.reading``, ``train.streaming``, ``pipelines.shards``) and the build's
remote output (``pipelines``) agree. Pure functions over URL strings; nothing heavy is imported at module level.

Credentials and endpoints are fsspec's and the protocol library's own: for S3, the usual ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL`` (an S3-compatible server) environment variables or
``~/.aws/config``; any fsspec option as ``FSSPEC_<PROTOCOL>_<OPTION>`` (fsspec's configuration, read when fsspec is
imported). Nothing here stores a secret.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

_FSSPEC_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

RETRY_ATTEMPTS = 4
"""Attempts of one remote call before its error is final (3 retries)."""
RETRY_BASE_DELAY_S = 0.5
"""First backoff; doubled at each retry (0.5 s, 1 s, 2 s: a transient failure gets ~3.5 s to clear)."""
READ_CHUNK = 1 << 20
"""Bytes the buffered reader of ``open_read`` asks the remote file for at a time."""
_LISTS = ("s3", "s3a", "file", "local", "gs", "gcs", "az", "abfs", "memory")
"""Protocols whose folders can be listed (an object store's prefix listing, a directory). Plain HTTP has no
listing: fsspec parses the links of an HTML index page where a server makes one, which is not the folder's
contents (a server without index pages, or one with an ``index.html``), so it is not used as one."""


_VERSION_KEYS = ("ETag", "VersionId", "Last-Modified", "LastModified", "mtime")
"""What names an object's version in fsspec's ``info`` (HTTP's and S3's ``ETag``, S3's ``VersionId``, HTTP's
``Last-Modified``, S3's ``LastModified``, a local file's ``mtime``), the first present is compared on a reopen."""


class RemoteError(OSError):
    """A remote location failed in a way a user can act on; its message is one line naming the URL."""


class RemoteNotFound(RemoteError, FileNotFoundError):
    """No object at a URL (HTTP 404, S3 ``NoSuchKey`` / ``NoSuchBucket``): a ``FileNotFoundError`` too."""


class RemoteDenied(RemoteError, PermissionError):
    """A refused credential (HTTP 401/403, S3 ``AccessDenied`` / ``InvalidAccessKeyId`` /
    ``SignatureDoesNotMatch``): a ``PermissionError`` too."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is an fsspec URL (``s3://``, ``https://``, ``file://``...) rather than a local path.

    webdataset's ``pipe:`` commands are not fsspec URLs (``distillkit.reading.is_url`` covers both).

    Args:
        location: a shard folder, index or shard as given by a user (a ``Path`` is never remote).
    """
    return isinstance(location, str) and bool(_FSSPEC_URL.match(location))


def location(value: str | os.PathLike[str]) -> Path | str:
    """A shard folder as readers take it: a URL stays a string (``Path("s3://b/x")`` would make it ``s3:/b/x``),
    anything else becomes a ``Path``.

    Args:
        value: a ``--shards`` value, a folder path or URL.
    """
    return value if is_remote(value) else Path(value)  # type: ignore[return-value]


def local_path(url: str) -> Path | None:
    """The local path a ``file://`` (or fsspec ``local://``) URL names, ``None`` for any other URL: the checks that
    only a file system allows (a shard that is a symlink out of its folder) apply to these as to a plain path.

    Args:
        url: an fsspec URL.
    """
    if url.split("://", 1)[0].lower() not in ("file", "local"):
        return None
    return Path(filesystem(url)[1])


def join(base: str, name: str) -> str:
    """``base/name`` for a URL folder (one slash between, whatever ``base`` ends with).

    Args:
        base: a folder URL (``s3://bucket/prefix`` or ``https://host/path/``).
        name: a plain file name inside it.
    """
    return f"{base.rstrip('/')}/{name}"


def child(folder: Path | str, name: str) -> Path | str:
    """``folder/name``: a URL for a URL folder, a ``Path`` for a local one.

    Args:
        folder: a shard folder (``location``).
        name: a plain file name inside it.
    """
    return join(folder, name) if is_remote(folder) else Path(folder) / name  # type: ignore[arg-type]


TIMEOUT_ENV = "DISTILLKIT_REMOTE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
"""Seconds a connection or one read may wait on a silent server (http(s) and S3) before it fails (and is retried by
``with_retries``): a stalled server fails in about ``RETRY_ATTEMPTS`` times this, not in aiohttp's 5 minutes per try
(and no total limit cuts a large shard that keeps arriving). Set ``DISTILLKIT_REMOTE_TIMEOUT_S`` to change it."""


def timeout_s() -> float:
    """``DISTILLKIT_REMOTE_TIMEOUT_S`` when set (a number of seconds > 0), else ``DEFAULT_TIMEOUT_S``.

    Raises:
        RemoteError: a value that is not a positive number (one line naming the variable).
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise RemoteError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def _options(protocol: str) -> dict[str, Any]:
    """fsspec options that make ``with_retries`` the one retry layer and bound how long a silent server is waited
    for; a user's own ``FSSPEC_<PROTOCOL>_...`` options are kept where they do not contradict these."""
    import fsspec.config

    # fsspec keeps FSSPEC_HTTP_* under "http" for https:// too (and s3's for s3a://): read every name of the
    # protocol's class, as fsspec's own apply_config does for the class it builds
    from fsspec.registry import get_filesystem_class

    names = get_filesystem_class(protocol).protocol
    user: dict[str, Any] = {}
    for name in [names] if isinstance(names, str) else list(names):
        user.update(fsspec.config.conf.get(name, {}))
    seconds = timeout_s()
    if protocol in ("http", "https"):
        import aiohttp

        # fsspec's default is aiohttp's ClientTimeout(total=300): a stalled server takes 5 min per try, and a
        # shard whose body takes longer than 5 min to arrive is cut. A per-read limit has neither fault.
        client = dict(user.get("client_kwargs") or {})
        client["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)
        return {"client_kwargs": client}
    if protocol in ("s3", "s3a"):
        # botocore retries a refused or timed-out request itself (legacy mode: 5 attempts with backoff), under
        # with_retries' own attempts: 4 x 5 tries took 36 s to report an endpoint refusing connections. One
        # attempt each (botocore/config.py ``retries``: ``total_max_attempts`` counts the first), and s3fs's own
        # loop (``S3FileSystem.retries``, s3fs/core.py ``_error_wrapper``) is set to 1 by ``filesystem``.
        config = dict(user.get("config_kwargs") or {})
        config.update(connect_timeout=seconds, read_timeout=seconds, retries={"total_max_attempts": 1})
        return {"config_kwargs": config}
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem serving ``url`` and the path inside it.

    Its options bound how long a silent server is waited for (``timeout_s``) and leave retrying to
    ``with_retries`` (``_options``).

    Args:
        url: an fsspec URL.

    Raises:
        RemoteError: the protocol is unknown or its package is not installed (one line saying which to install),
            or the filesystem could not be set up (a protocol that connects when created, ``ftp://``, to a server
            that refuses: one line naming the URL).
    """
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    options = _options(protocol)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise RemoteError(f"{url}: cannot open this kind of URL ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - whatever the protocol's constructor raised: one line naming the URL
        found = _one_line(exc, url, 1)
        if not isinstance(found, RemoteError):
            from distillkit.messages import one_line

            found = RemoteError(f"{url}: cannot open ({one_line(exc, with_type=True)})")
        raise found from exc
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own retry loop (s3fs/core.py: class attribute ``retries = 5``): with_retries retries
    return fs, path


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if status is None:  # botocore's ClientError (what s3fs wraps): the HTTP status is in its response
        response = getattr(exc, "response", None)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    return status if isinstance(status, int) else None


def _cause(exc: BaseException) -> BaseException:
    """What really failed: fsspec's HTTP ``info`` turns every failure of its HEAD and GET into a bare
    ``FileNotFoundError(url)`` raised from the real one (``fsspec/implementations/http.py``, ``_info``: "If get
    failed, then raise a FileNotFoundError"), so a server down or a 503 would read as a missing object."""
    while (isinstance(exc, FileNotFoundError) and exc.__cause__ is not None
           and not isinstance(exc.__cause__, FileNotFoundError) and _status(exc.__cause__) != 404):
        exc = exc.__cause__
    return exc


def _transient(exc: BaseException) -> bool:
    """Whether a failure may clear by itself (connection reset, timeout, a server's 5xx / throttling)."""
    exc = _cause(exc)
    if isinstance(exc, (RemoteError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # a RemoteError is final: an inner call already retried it
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    name = type(exc).__name__
    if name in ("ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
                "ServerTimeoutError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ConnectionClosedError", "ResponseStreamingError", "IncompleteRead"):
        return True
    status = _status(exc)
    return status is not None and (status >= 500 or status == 429)


def with_retries(call: Callable[[], T], what: str, attempts: int | None = None,
                 base_delay: float | None = None) -> T:
    """``call()``, retried with exponential backoff while it fails transiently; a final failure is one line.

    Args:
        call: the remote operation (no arguments).
        what: the URL it works on, for the message.
        attempts: tries in all (>= 1); default ``RETRY_ATTEMPTS``, read at each call (tests shorten it).
        base_delay: seconds before the first retry, doubled at each one; default ``RETRY_BASE_DELAY_S``.

    Raises:
        RemoteNotFound: no such object (a ``FileNotFoundError``), one line naming ``what``.
        RemoteDenied: a refused credential (a ``PermissionError``), one line naming ``what``.
        RemoteError: any other failure of the remote, after the retries for a transient one. Other exceptions
            (a caller's own) are re-raised as they are.
    """
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    delay = RETRY_BASE_DELAY_S if base_delay is None else base_delay
    for attempt in range(attempts):
        try:
            return call()
        except RemoteError:
            raise  # already one line, already retried where it arose
        except Exception as exc:  # classified below; anything else is re-raised as it is
            if _transient(exc) and attempt + 1 < attempts:
                time.sleep(delay * 2**attempt)
                continue
            line = _one_line(exc, what, attempt + 1)
            if line is exc:  # not a remote failure we can say better: as it was
                raise
            raise line from exc
    raise AssertionError("unreachable")


def _one_line(exc: BaseException, what: str, tries: int) -> BaseException:
    from distillkit.messages import one_line

    exc = _cause(exc)
    status = _status(exc)
    if isinstance(exc, FileNotFoundError) or status == 404:
        return RemoteNotFound(f"{what}: no such object")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore's, found no key
        return RemoteDenied(f"{what}: no credentials found ({one_line(exc, with_type=False)}): set "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them in ~/.aws/credentials")
    if isinstance(exc, PermissionError) or status in (401, 403):
        return RemoteDenied(f"{what}: access denied (check the credentials: {one_line(exc, with_type=True)})")
    if _transient(exc):
        after = f" after {tries} tries" if tries > 1 else ""
        return RemoteError(f"{what}: failed{after} ({one_line(exc, with_type=True)})")
    if isinstance(exc, OSError) or status is not None:
        return RemoteError(f"{what}: {one_line(exc, with_type=True)}")
    return exc


def read_bytes(url: str) -> bytes:
    """The whole object at ``url`` (an ``index.json`` or a shard record), with retries.

    Args:
        url: an fsspec URL.

    Raises:
        RemoteNotFound / RemoteDenied / RemoteError: see ``with_retries``.
    """
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), url)


def read_many(urls: Sequence[str]) -> dict[str, bytes | None]:
    """Many small objects of one place (a folder's shard records) at once: fsspec fetches them concurrently
    (one round trip's latency for all, not one per object); a failed one is fetched again alone with retries.

    Args:
        urls: fsspec URLs of one filesystem.

    Returns:
        ``{url: bytes}``, ``None`` for a missing object.

    Raises:
        RemoteDenied / RemoteError: an object that cannot be read, after the retries (one line naming it).
    """
    if not urls:
        return {}
    fs, _ = filesystem(urls[0])
    paths = [filesystem(url)[1] for url in urls]
    try:
        got = fs.cat(paths, on_error="return")
    except Exception:  # noqa: BLE001 - the batch itself failed: each object alone says why, with retries
        got = {}
    out: dict[str, bytes | None] = {}
    for url, path in zip(urls, paths, strict=True):
        data = got.get(path) if isinstance(got, dict) else None
        if isinstance(data, bytes):
            out[url] = data
            continue
        try:
            out[url] = read_bytes(url)
        except RemoteNotFound:
            out[url] = None
    return out


def can_list(url: str) -> bool:
    """Whether the folder at ``url`` can be listed (``list_folder``): an object store or a file system, not HTTP.

    Args:
        url: a folder URL.
    """
    protocol = url.split("://", 1)[0].lower()
    return protocol in _LISTS


def list_folder(url: str) -> dict[str, int]:
    """The objects directly inside the folder ``url``: ``{name: size in bytes}`` (sub-folders left out).

    Args:
        url: a folder URL whose protocol ``can_list``.

    Raises:
        RemoteError: the listing failed (see ``with_retries``).
    """
    fs, path = filesystem(url)

    def ls() -> list[dict[str, Any]]:
        fs.invalidate_cache(path)  # a listing cached earlier in this process would hide what changed since
        return fs.ls(path, detail=True)

    entries = with_retries(ls, url)
    return {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") != "directory"}


class _ResumingReader(io.RawIOBase):
    """A remote object read front to back that survives a dropped connection: a read that fails transiently
    reopens the object and continues at the byte offset reached (a range request), with ``with_retries``'s
    bounded backoff; a failure that persists is one line naming the URL. Each retry starts from the offset
    reached so far, so a flaky link never makes a shard be read again from its start.

    A reopen continues only the same object: its version (``ETag``, else its modification time) and size must be
    those of the first open, or the read ends with "changed while being read" rather than splice two objects. A
    server that ignores range requests (or gives no size) cannot be resumed: the read ends in one line saying so,
    rather than read the object again from its start (a shard may be gigabytes, each drop would cost all of it)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url, self.name = url, url
        self.fs, self.path = filesystem(url)
        self.pos = 0
        self._identity: tuple[Any, Any] | None = None
        self._file: Any = None
        self._file = with_retries(lambda: self._open(), url)

    def _open(self) -> Any:
        if self._identity is not None:
            self.fs.invalidate_cache(self.path)  # s3fs answers info from its listings cache: ask the store again
        info = self.fs.info(self.path)  # one HEAD; passed on as the size, so the open makes none of its own
        identity = (next((info[k] for k in _VERSION_KEYS if info.get(k)), None), info.get("size"))
        if self._identity is None:
            self._identity = identity
        elif identity != self._identity:
            raise RemoteError(f"{self.url}: changed while being read (version {self._identity[0]}, "
                              f"{self._identity[1]} bytes when opened; now {identity[0]}, {identity[1]} bytes): "
                              "read it again")
        size = info.get("size")
        http = self.url.split("://", 1)[0].lower() in ("http", "https")
        if self.pos == 0 and http:
            # One streaming GET for the whole object (any HTTP server); a reopen at an offset needs range
            # requests, which fsspec's ranged file makes.
            return self.fs.open(self.path, "rb", block_size=0, size=size)
        if http and not size:  # fsspec would open a streaming file, which cannot seek
            raise RemoteError(f"{self.url}: connection dropped at byte {self.pos}; the server gives no size "
                              "(no Content-Length), so the read cannot resume there")
        # HTTP files take the size (no second HEAD). S3 files are opened without it: s3fs then reads the object's
        # ETag itself and sends it as IfMatch with every ranged GET (s3fs core.py:2629-2638), so the 50 MiB reads of
        # one open cannot splice two versions of a replaced object.
        f = self.fs.open(self.path, "rb", size=size) if http and size else self.fs.open(self.path, "rb")
        if self.pos:
            f.seek(self.pos)
        return f

    def _read(self, n: int) -> bytes:
        try:
            if self._file is None:
                self._file = self._open()
            data = self._file.read(n)
            size = self._identity[1] if self._identity is not None else None
            if not data and n and isinstance(size, int) and self.pos < size:
                # A close-delimited body (no Content-Length) cut short reads as a clean end: the size the server
                # gave on opening says it is not one; reopened at the offset like any dropped connection.
                raise ConnectionError(f"connection closed at byte {self.pos} of {size}")
        except ValueError as exc:
            self._drop()
            if self.pos == 0:
                raise
            # fsspec's ranged HTTP file, answered with the whole object: "The HTTP server doesn't appear to support
            # range requests" (fsspec/implementations/http.py, ``async_fetch_range``).
            raise RemoteError(f"{self.url}: connection dropped at byte {self.pos}; the server ignores range "
                              "requests, so the read cannot resume there") from exc
        except Exception:
            self._drop()  # the next try reopens at self.pos
            raise
        return data

    def _drop(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001, S110 - a broken connection may fail to close too; it is dropped
                pass

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = with_retries(lambda: self._read(len(b)), self.url)
        n = len(data)
        b[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()

    def __repr__(self) -> str:  # webdataset appends the stream to error messages
        return f"<remote reader of {self.url!r}>"


def open_seekable(url: str) -> IO[bytes]:
    """``url`` opened for random access (fsspec's ranged file: each seek past its cache is a range request), for
    readers that skip over a tar's members (``tarfile`` mode ``"r:"``) rather than stream it; retries on the open.

    Args:
        url: an fsspec URL.

    Raises:
        RemoteNotFound / RemoteDenied / RemoteError: see ``with_retries``.
    """
    fs, path = filesystem(url)
    return with_retries(lambda: fs.open(path, "rb"), url)


def open_read(url: str) -> IO[bytes]:
    """``url`` opened for streaming reads, front to back, without a local copy: a buffered reader whose reads
    survive a dropped connection (reopened at the byte offset, bounded retries) and whose final failure is one
    line naming the URL.

    Args:
        url: an fsspec URL.

    Raises:
        RemoteNotFound / RemoteDenied / RemoteError: on the open (and on a read, later): see ``with_retries``.
    """
    return io.BufferedReader(_ResumingReader(url), buffer_size=READ_CHUNK)


__all__ = ["RemoteDenied", "RemoteError", "RemoteNotFound", "can_list", "child", "filesystem", "is_remote", "join",
           "list_folder", "local_path", "location", "open_read", "open_seekable", "read_bytes", "read_many",
           "timeout_s", "with_retries"]
