"""A build's output in an object store: ``RemotePrefix``, the ``pipelines.output.OutputLocation`` of an
``s3://bucket/prefix`` (``s3a://`` too).

An object store has no rename and no ``flock``, so a remote prefix gets the same guarantees otherwise:

* **Whole objects only.** A worker writes its shard to a local temporary folder exactly as into a local output
  (``shards.write_shard``: same bytes, same sha256), then uploads it with one ``put_file``; the shard's record
  follows only after the upload succeeded. An S3 PUT creates the object whole or not at all; a shard larger
  than twice s3fs's part size (50 MiB by default) goes up as a multipart upload, which S3 shows under its
  name only once ``CompleteMultipartUpload`` succeeds and which s3fs aborts when a part fails (s3fs 2026.9.0
  ``core.py:1471-1541``, ``_put_file``: ``put_object`` below ``min(5 GiB, 2 * chunksize)``, else
  ``create_multipart_upload`` ... ``complete_multipart_upload``, ``_abort_mpu`` on an exception). A worker
  killed mid-upload leaves an incomplete multipart upload (invisible, but stored and billed): the build aborts
  its own dataset's (listed under the prefix, page by page) at the start and the end, as the local build
  removes its temporary files; a credential without ``s3:ListBucketMultipartUploads`` makes that one warning.
  The local copy goes to the dask worker's own directory (purged by distributed when a killed worker's
  successor starts) or, without a worker, the temporary folder (swept of our folders older than a day).
* **Resume from what is there.** The client lists the prefix once; a task reuses its shard when the listing
  holds both the shard and its record, the record (one small read) matches the plan, and the listed size is
  the recorded one. A shard not newer than its record is not downloaded again: the store checked each upload's
  integrity (botocore sends a checksum with every PUT), an object changes only as a whole, and the build wrote
  the record after the shard. A shard newer than its record (replaced, or a local build uploaded with
  ``aws s3 sync``) or without a time is hashed in one streamed read and reused only if it matches.
* **``index.json`` last**, removed before anything changes (as locally), so a reader never trusts a prefix
  that is half rebuilt.
* **One build at a time.** A lock object ``PREFIX/.distillkit.lock`` is created with a conditional write (S3
  ``PutObject`` with ``If-None-Match: *``, s3fs's ``pipe_file(..., mode="create")``: ``core.py:1403-1428``),
  which fails with ``FileExistsError`` when the object exists (s3fs ``errors.py:145-149``). It names the host,
  process and time of the build that holds it, and a token; the build deletes it when it ends (also when it
  stops between the write and the read-back), only if it still holds its token (a delete conditional on the
  ETag read, ``If-Match``), so a lock deleted by hand and taken by another build stays that build's. A killed
  build leaves it, and the refusal says which object to delete then. A store that ignores ``If-None-Match`` (some older
  S3-compatible servers) cannot refuse a second build this way: the lock is read back after the write, which
  catches only a second build that overwrote it in between.

Credentials and endpoints are the protocol library's own (``distillkit.remote``): the client and every worker
need them (an embedded LocalCluster's workers inherit the client's environment; workers started elsewhere
need the same variables).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distillkit import remote
from distillkit.messages import one_line
from distillkit.pipelines.manifest import Manifest
from distillkit.pipelines.output import (
    INDEX_NAME,
    LOCK_NAME,
    BuildError,
    Found,
    Listing,
    OutputLocation,
    Samples,
    parse_record,
    shard_number,
)
from distillkit.pipelines.shards import (
    ShardRecord,
    json_text,
    record_name,
    write_shard,
)

log = logging.getLogger(__name__)

UPLOADS_PAGE = 1000
"""Multipart uploads asked for per page (S3's maximum; tests lower it to check the paging)."""
SCRATCH_PREFIX = "distillkit-shard-"
"""Name of a worker's local folder for the shard it writes before the upload."""
SCRATCH_MAX_AGE_S = 24 * 3600
"""A scratch folder left this long in the temporary folder is a killed writer's: no shard takes a day to write."""



class RemotePrefix(OutputLocation):
    """A prefix of an object store (``s3://bucket/prefix``): whole-object uploads, a conditional lock object."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = remote.filesystem(self.url)
        self._uploads_unlisted = False  # set once listing multipart uploads failed: warned once per build

    @property
    def where(self) -> str:
        return self.url

    @property
    def index_path(self) -> str:
        return remote.join(self.url, INDEX_NAME)

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _call(self, call: Callable[[], Any], name: str) -> Any:
        return remote.with_retries(call, remote.join(self.url, name))

    def prepare(self, m: Manifest) -> None:
        # Nothing to create: a prefix exists as soon as an object is under it. A missing bucket is reported by
        # the lock's write, the first one, and buckets are not created implicitly (their region, access policy
        # and lifecycle are the owner's choice).
        return None

    @contextmanager
    def lock(self, m: Manifest) -> Iterator[None]:
        lock_url = remote.join(self.url, LOCK_NAME)
        token = uuid.uuid4().hex
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "dataset": m.name, "token": token,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        body = json_text(holder).encode()

        def create() -> None:
            try:
                self.fs.pipe_file(self._path(LOCK_NAME), body, mode="create")
            except FileExistsError:
                pass  # held: by another build, or by this one if a retried write follows a lost reply

        written = False
        try:
            try:
                self._call(create, LOCK_NAME)
                written = True
                # Ours only if it holds our token; read back even after a successful write: a store that ignores
                # If-None-Match lets a second build overwrite it, and this catches one that did so in between.
                now, _ = self._read_lock()
            except BaseException as exc:
                # Written, then the read-back failed (or Ctrl-C came, perhaps after the PUT left): a lock left by
                # a build that never started would refuse every later one. Removed only if it holds our token.
                if written or not isinstance(exc, Exception):
                    self._release(token, lock_url)
                raise
        except FileNotFoundError:
            raise BuildError(f"{lock_url}: cannot write the build's lock object: no such bucket (create it first)"
                             ) from None
        except OSError as exc:  # a refused credential, an unreachable store (one line already): cannot start
            raise BuildError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the store's own error (botocore's NoSuchBucket): cannot start
            raise BuildError(f"{lock_url}: cannot write the build's lock object ({one_line(exc, with_type=True)})"
                             ) from None
        if now.get("token") != token:
            raise BuildError(f"{self.url}: another build is writing this prefix (lock object {lock_url}, taken by "
                             f"{now.get('host', '?')} pid {now.get('pid', '?')} at {now.get('since', '?')}); wait "
                             f"for it, or if that build is no longer running delete {lock_url} and rerun")
        try:
            yield
        finally:
            self._release(token, lock_url)

    def _read_lock(self) -> tuple[dict[str, Any], str | None]:
        """The lock object's content ({} when it is gone or unreadable) and its ETag (None where the store gives
        none). s3fs reads an opened object with ``If-Match`` on the ETag its HEAD returned (``core.py:2629-2638``),
        so the content is that version's."""
        path = self._path(LOCK_NAME)

        def read() -> tuple[bytes, str | None]:
            self.fs.invalidate_cache(path)  # a cached listing entry would give an old ETag
            with self.fs.open(path, "rb") as f:
                return f.read(), (getattr(f, "details", None) or {}).get("ETag")

        try:
            data, etag = self._call(read, LOCK_NAME)
        except FileNotFoundError:  # released in between
            return {}, None
        try:
            holder = json.loads(data)
        except ValueError:  # not ours to parse
            return {}, etag
        return (holder if isinstance(holder, dict) else {}), etag

    def _release(self, token: str, lock_url: str) -> None:
        """Delete the lock object if it is this build's (best effort: a failure is a warning).

        A lock deleted by hand (believed stale) and taken by another build is that build's: deleting it blindly
        would let a third one start beside it. The delete is conditional on the ETag read with our token (S3
        ``DeleteObject`` with ``If-Match``); a store that ignores ``If-Match`` on deletes leaves a window of one
        round trip between the read and the delete, in which a lock deleted by hand and re-taken would be lost.

        Args:
            token: this build's token (in the lock's body).
            lock_url: the lock object's URL, for messages.
        """
        path = self._path(LOCK_NAME)
        try:
            holder, etag = self._read_lock()
            if holder.get("token") != token:
                if holder:
                    log.warning("%s: the lock now belongs to another build (%s pid %s): left in place", lock_url,
                                holder.get("host", "?"), holder.get("pid", "?"))
                return
            if etag and hasattr(self.fs, "call_s3"):
                bucket, key, _ = self.fs.split_path(path)

                def delete() -> None:
                    self.fs.invalidate_cache(path)
                    try:
                        self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
                    except OSError as exc:
                        if _s3_status(exc) not in (400, 501):  # 412: replaced since our read; others: the store's
                            raise
                        # A store that rejects If-Match on deletes (400 / 501 NotImplemented): the token was
                        # compared just before; a plain delete leaves the window described above.
                        self.fs.rm_file(path)

                self._call(delete, LOCK_NAME)
            else:
                self._call(lambda: self.fs.rm_file(path), LOCK_NAME)
        except FileNotFoundError:
            pass  # already gone
        except OSError as exc:  # RemoteError, or s3fs's PreconditionFailed (412): replaced after our read
            log.warning("%s: could not remove the build's lock (%s): if no build is running, delete it before the "
                        "next build", lock_url, exc)

    def dataset_name(self) -> str | None:
        try:
            data = json.loads(self._call(lambda: self.fs.cat_file(self._path(INDEX_NAME)), INDEX_NAME))
        except (FileNotFoundError, ValueError):  # no dataset, or a broken index: nothing to protect by name
            return None
        return data.get("name") if isinstance(data, dict) else None

    def unpublish(self) -> None:
        try:
            self._call(lambda: self.fs.rm_file(self._path(INDEX_NAME)), INDEX_NAME)
        except FileNotFoundError:
            pass

    def scan(self) -> Listing:
        try:
            # refresh: the workers wrote from other processes, whose writes this process's cache has not seen
            entries = self._call(lambda: self.fs.ls(self.root, detail=True, refresh=True), "")
        except FileNotFoundError:
            return {}
        listing: Listing = {}
        for entry in entries:
            if entry.get("type") != "file":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            listing[name] = (int(entry.get("size") or 0), _timestamp(entry))
        return listing

    def remove_stale(self, name: str, n_tasks: int, listing: Listing | None) -> None:
        shard = shard_number(name)
        stale = []
        for object_name in sorted(listing or {}):
            match = shard.fullmatch(object_name)
            if match and int(match.group(1)) >= n_tasks:
                stale.append(self._path(object_name))
                if record_name(object_name) in (listing or {}):
                    stale.append(self._path(record_name(object_name)))
        if stale:
            self._call(lambda: self.fs.rm(stale), "")
        self.remove_temp_files(name)

    def remove_temp_files(self, name: str) -> int:
        """Abort this dataset's incomplete multipart uploads under the prefix (S3: a killed worker's unfinished
        shard, invisible but stored). Other stores have no such leftovers: 0.

        Best effort: listing uploads needs ``s3:ListBucketMultipartUploads``, which a policy scoped to a prefix
        often lacks; a refusal (or any failure) is one warning per build and the build goes on (a bucket
        lifecycle rule ``AbortIncompleteMultipartUpload`` then removes them)."""
        if not hasattr(self.fs, "call_s3") or self._uploads_unlisted:
            return 0
        bucket, key, _ = self.fs.split_path(self.root)
        prefix = f"{key.rstrip('/')}/" if key else ""
        ours = re.compile(rf"(?:{re.escape(name)}-\d{{6}}\.(?:tar|json)|{re.escape(INDEX_NAME)})")
        removed = 0
        try:
            for upload in self._multipart_uploads(bucket, prefix):
                upload_key = upload.get("Key", "")
                if upload_key.startswith(prefix) and ours.fullmatch(upload_key[len(prefix):]):
                    self._call(lambda u=upload: self.fs.abort_mpu(bucket, u["Key"], u["UploadId"]), upload_key)
                    removed += 1
        except OSError as exc:  # RemoteDenied (a PermissionError) / RemoteError: one line already
            self._uploads_unlisted = True
            log.warning("%s: cannot remove unfinished multipart uploads left by killed workers (%s); they stay "
                        "stored (and billed) until removed, e.g. by a bucket lifecycle rule "
                        "AbortIncompleteMultipartUpload", self.url, exc)
        return removed

    def _multipart_uploads(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        """The incomplete multipart uploads under ``prefix``, every page. (s3fs's ``list_multipart_uploads``
        lists the whole bucket and returns its first page only: s3fs 2026.9.0 ``core.py:2318-2320``.)"""
        markers: dict[str, str] = {}
        while True:
            page = self._call(lambda m=markers: self.fs.call_s3(  # type: ignore[misc]
                "list_multipart_uploads", Bucket=bucket, Prefix=prefix, MaxUploads=UPLOADS_PAGE, **m), "")
            yield from page.get("Uploads") or []
            if not page.get("IsTruncated"):
                return
            markers = {"KeyMarker": page.get("NextKeyMarker") or "",
                       "UploadIdMarker": page.get("NextUploadIdMarker") or ""}
            if not markers["KeyMarker"]:
                return  # a store that says "truncated" without a marker: stop rather than loop

    def existing_record(self, tar_name: str, accept: Callable[[ShardRecord], bool],
                        found: Found | None) -> ShardRecord | None:
        if found is None:
            return None
        try:
            text = self._call(lambda: self.fs.cat_file(self._path(record_name(tar_name))), record_name(tar_name))
        except FileNotFoundError:  # removed since the listing
            return None
        rec = parse_record(text)
        if rec is None or not accept(rec) or rec.bytes != found.tar_size:
            return None
        # Objects change only whole: a shard not newer than its record is the one the build uploaded before
        # writing the record. One newer (uploaded again, e.g. a local build copied with ``aws s3 sync``, which
        # may send records first), or without a time, is hashed (one streamed read): reused if the bytes match.
        if found.tar_mtime is not None and found.record_mtime is not None and found.tar_mtime <= found.record_mtime:
            return rec
        try:
            digest = _sha256_url(remote.join(self.url, tar_name))
        except FileNotFoundError:  # removed since the listing
            return None
        return rec if digest == rec.sha256 else None

    def write_shard(self, tar_name: str, samples: Samples) -> tuple[int, str, int]:
        # Written locally first, exactly as into a local output (same bytes and sha256), then uploaded whole.
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=_scratch_root()) as tmp:
            local = Path(tmp) / tar_name
            size, digest, n = write_shard(local, samples)
            self._call(lambda: self.fs.put_file(str(local), self._path(tar_name)), tar_name)
        return size, digest, n

    def write_json(self, name: str, obj: Any) -> None:
        data = json_text(obj).encode()
        self._call(lambda: self.fs.pipe_file(self._path(name), data), name)


def _s3_status(exc: BaseException) -> int | None:
    """The HTTP status of the botocore error s3fs translated into ``exc`` (s3fs ``errors.py:165-167`` keeps it
    as the cause); None for another failure."""
    response = getattr(exc.__cause__, "response", None)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    return status if isinstance(status, int) else None


def _sha256_url(url: str) -> str:
    """The sha256 of the object at ``url``, read front to back once (``remote.open_read``: resumes a dropped
    connection, one-line errors)."""
    digest = hashlib.sha256()
    with remote.open_read(url) as f:
        while block := f.read(remote.READ_CHUNK):
            digest.update(block)
    return digest.hexdigest()


_swept = False


def _scratch_root() -> str | None:
    """Where a worker writes a shard before uploading it. In a dask worker, its own local directory: a killed
    worker's is purged by the next worker started on that machine (distributed's ``WorkSpace``: each worker
    holds a lock file on its directory, and ``diskutils.py:166-253`` deletes directories whose lock is free).
    Elsewhere (the serial scheduler) the temporary folder, where this process's first shard first removes our
    scratch folders older than ``SCRATCH_MAX_AGE_S`` (left by a killed build, each holding up to a shard)."""
    global _swept
    try:
        from distributed import get_worker

        return get_worker().local_directory
    except (ImportError, ValueError):  # not in a worker
        pass
    if not _swept:
        _swept = True
        sweep_scratch(Path(tempfile.gettempdir()))
    return None


def sweep_scratch(root: Path, max_age_s: float = SCRATCH_MAX_AGE_S) -> int:
    """Remove our scratch folders in ``root`` untouched for ``max_age_s``; returns how many.

    Args:
        root: the temporary folder.
        max_age_s: the age (newest modification inside) past which a folder is a dead writer's.
    """
    removed = 0
    cutoff = time.time() - max_age_s
    for folder in root.glob(f"{SCRATCH_PREFIX}*"):
        try:
            if not folder.is_dir() or folder.is_symlink():
                continue
            newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
            if newest < cutoff:
                shutil.rmtree(folder)
                removed += 1
        except OSError:  # another user's, or removed in between: not ours to insist on
            continue
    return removed


def _timestamp(entry: dict[str, Any]) -> float | None:
    """An fsspec listing entry's last-modified time (S3 ``LastModified``, others ``mtime``) as a POSIX time."""
    value = entry.get("LastModified", entry.get("mtime"))
    if value is None:
        return None
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


__all__ = ["RemotePrefix", "sweep_scratch"]
