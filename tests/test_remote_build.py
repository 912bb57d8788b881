"""Building into object storage (issue 24 item 2): ``output.dir = "s3://bucket/prefix"`` against moto's S3 server
on 127.0.0.1 (``pipelines.output``, ``pipelines.output_s3``).

One serial build of six images (three uniseg shards, about 1 s) into a local folder and one into the server are
shared by the module; tests that change a prefix work on a copy of it (server-side copies: cheap).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.cli import main
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.output import LOCK_NAME, LocalFolder, output_location
from distillkit.pipelines.output_s3 import RemotePrefix
from distillkit.pipelines.runner import BuildError, build
from distillkit.pipelines.shards import iter_samples
from distillkit.remote import RemoteError
from tests.conftest import kill_build_at_shard
from tests.s3_helpers import moto_s3

BUCKET = "shards"
SETS = ("cluster.scheduler=serial", "output.samples_per_shard=2")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with one bucket; the environment (credentials, endpoint) that s3fs, and dask
    workers started from this process, read. Yields the s3fs filesystem."""
    with moto_s3(BUCKET) as fs:
        yield fs


def _manifest(images: Path, out: str | Path, *sets: str):
    return load_manifest("demo-uniseg", [f"source.root={images}", f"output.dir={out}", *SETS, *sets])


def _objects(fs, prefix: str) -> dict[str, bytes]:
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(f"{BUCKET}/{prefix}", refresh=True)}


def _copy_prefix(fs, src: str, dst: str) -> str:
    # Shards before records, as a build writes them: each copy gets a new LastModified, and a record copied in
    # an earlier second than its shard would make the rerun hash that shard rather than trust the listing.
    for path in sorted(fs.ls(f"{BUCKET}/{src}", refresh=True), key=lambda p: not p.endswith(".tar")):
        fs.copy(path, f"{BUCKET}/{dst}/{path.rsplit('/', 1)[-1]}")
    return f"s3://{BUCKET}/{dst}"


@pytest.fixture(scope="module")
def local_dir(six_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "uniseg"
    build(_manifest(six_images, out), progress=False)
    return out


@pytest.fixture(scope="module")
def built(s3, six_images):
    """The same manifest built serially into s3://shards/built (read-only: copy it before changing it)."""
    return build(_manifest(six_images, f"s3://{BUCKET}/built"), progress=False)


def _same_as_local(objects: dict[str, bytes], local_dir: Path, url: str, ignore: tuple[str, ...] = ()) -> None:
    """Every shard and record byte-identical to the local build's; index.json equal but for output.dir (and the
    manifest sections in ``ignore``, which do not decide the bytes: ``cluster``)."""
    local = {p.name: p.read_bytes() for p in local_dir.iterdir() if p.name != LOCK_NAME}
    assert sorted(objects) == sorted(local)  # no lock object left, nothing else written
    for name, data in local.items():
        if name != "index.json":
            assert objects[name] == data, name
    remote_index, local_index = json.loads(objects["index.json"]), json.loads(local["index.json"])
    assert remote_index["manifest"]["output"].pop("dir") == url
    assert local_index["manifest"]["output"].pop("dir") == str(local_dir)
    for section in ignore:
        remote_index["manifest"].pop(section), local_index["manifest"].pop(section)
    assert remote_index == local_index


def test_a_build_into_s3_gives_the_local_build_bytes(s3, built, local_dir):
    assert built.index_path == f"s3://{BUCKET}/built/index.json"
    assert (built.built_shards, built.reused_shards, built.written) == (3, 0, 6)
    _same_as_local(_objects(s3, "built"), local_dir, f"s3://{BUCKET}/built")


def test_a_rerun_reuses_every_shard_from_the_listing(s3, six_images, built, local_dir, monkeypatch):
    url = _copy_prefix(s3, "built", "rerun")
    downloads = []
    real = RemotePrefix.write_shard
    monkeypatch.setattr(RemotePrefix, "write_shard", lambda *a: downloads.append(a) or real(*a))
    result = build(_manifest(six_images, url), progress=False)
    assert (result.built_shards, result.reused_shards) == (0, 3) and not downloads
    _same_as_local(_objects(s3, "rerun"), local_dir, url)


def test_a_killed_build_resumes_with_only_the_missing_shard(s3, six_images, built, local_dir):
    url = _copy_prefix(s3, "built", "killed")
    s3.rm_file(f"{BUCKET}/killed/index.json")  # a build killed after two of three shards...
    s3.rm_file(f"{BUCKET}/killed/demo-uniseg-000001.tar")  # ...with its record left from before
    result = build(_manifest(six_images, url), progress=False)
    assert (result.built_shards, result.reused_shards) == (1, 2)
    _same_as_local(_objects(s3, "killed"), local_dir, url)


def test_a_shard_uploaded_after_its_record_is_hashed(s3, six_images, built, monkeypatch):
    """A shard newer than its record (replaced, or a local build uploaded with ``aws s3 sync``, records first) is
    reused only if its bytes hash to the record's sha256; another size is rebuilt without reading it."""
    from distillkit.pipelines import output_s3

    url = _copy_prefix(s3, "built", "replaced")
    shard = f"{BUCKET}/replaced/demo-uniseg-00000{{}}.tar".format
    good = [s3.cat_file(shard(i)) for i in range(3)]
    s3.pipe_file(shard(0), b"x" * 100)  # another size
    time.sleep(1.1)  # S3 times have one-second steps: written after their records
    s3.pipe_file(shard(1), good[1])  # the same bytes again: reused
    s3.pipe_file(shard(2), bytes(reversed(good[2])))  # the same size, other bytes: rebuilt
    hashed = []
    real = output_s3._sha256_url
    monkeypatch.setattr(output_s3, "_sha256_url", lambda u: hashed.append(u.rsplit("/", 1)[-1]) or real(u))
    result = build(_manifest(six_images, url), progress=False)
    assert (result.built_shards, result.reused_shards) == (2, 1)
    assert sorted(hashed) == ["demo-uniseg-000001.tar", "demo-uniseg-000002.tar"]
    assert [s3.cat_file(shard(i)) for i in range(3)] == good


def test_a_rebuild_killed_midway_leaves_no_index(s3, six_images, built, monkeypatch):
    url = _copy_prefix(s3, "built", "midway")
    kill_build_at_shard(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build(_manifest(six_images, url, "stages.uniap.min_size=5"), progress=False)  # another plan: rebuilds
    assert not s3.exists(f"{BUCKET}/midway/index.json") and not s3.exists(f"{BUCKET}/midway/{LOCK_NAME}")


def test_a_second_build_is_refused_while_the_lock_object_exists(s3, six_images, built, monkeypatch):
    url = _copy_prefix(s3, "built", "locked")
    m = _manifest(six_images, url)
    with RemotePrefix(url).lock(m):  # a build holding the prefix (or one killed, leaving its lock)
        with pytest.raises(BuildError, match=f"another build is writing this prefix .*delete {url}/{LOCK_NAME}"):
            build(m, progress=False)
        result = CliRunner().invoke(main, ["build", "demo-uniseg", "--quiet", *[f"--set={s}" for s in SETS],
                                           f"--set=source.root={six_images}", f"--set=output.dir={url}"])
        assert result.exit_code == 2, result.output
        # (the in-process server's request log shares the output: only the error lines count)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        assert f"delete {url}/{LOCK_NAME}" in errors[0]
    assert not s3.exists(f"{BUCKET}/locked/{LOCK_NAME}")
    assert build(m, progress=False).reused_shards == 3  # the lock goes with the build; nothing was changed


def test_a_build_releases_only_its_own_lock(s3, six_images, caplog):
    """A's lock deleted by hand (believed stale), B takes the prefix: A's end must not delete B's lock."""
    url = f"s3://{BUCKET}/handover"
    m = _manifest(six_images, url)
    lock = f"{BUCKET}/handover/{LOCK_NAME}"
    a, b = RemotePrefix(url), RemotePrefix(url)
    held_a = a.lock(m)
    held_a.__enter__()
    s3.rm_file(lock)
    held_b = b.lock(m)
    held_b.__enter__()
    b_lock = s3.cat_file(lock)
    held_a.__exit__(None, None, None)
    assert s3.cat_file(lock) == b_lock and "belongs to another build" in caplog.text
    held_b.__exit__(None, None, None)
    assert not s3.exists(lock)


def test_the_lock_delete_is_conditional(s3, six_images, monkeypatch, caplog):
    """Between the release's read (our token) and its delete, the lock is replaced: the delete carries the
    ETag read (If-Match) and the store refuses it, so the new holder keeps its lock."""
    url = f"s3://{BUCKET}/ifmatch"
    lock = f"{BUCKET}/ifmatch/{LOCK_NAME}"
    a = RemotePrefix(url)
    with a.lock(_manifest(six_images, url)):
        ours = a._read_lock()
        s3.pipe_file(lock, b'{"token": "another build"}')  # deleted by hand and re-taken, after our read
        monkeypatch.setattr(a, "_read_lock", lambda: ours)
    assert s3.cat_file(lock) == b'{"token": "another build"}' and "could not remove the build's lock" in caplog.text
    s3.rm_file(lock)


def test_a_store_without_conditional_deletes_still_releases(s3, six_images, monkeypatch):
    """A store that rejects If-Match on DeleteObject (501 NotImplemented): the token was compared, the lock goes."""
    from botocore.exceptions import ClientError
    from s3fs import S3FileSystem
    from s3fs.errors import translate_boto_error

    real = S3FileSystem.call_s3

    def no_if_match(self, method, *args, **kwargs):
        if method == "delete_object" and "IfMatch" in kwargs:  # as s3fs raises it (core.py, _error_wrapper)
            raise translate_boto_error(ClientError({"Error": {"Code": "NotImplemented", "Message": "If-Match"},
                                                    "ResponseMetadata": {"HTTPStatusCode": 501}}, "DeleteObject"))
        return real(self, method, *args, **kwargs)

    monkeypatch.setattr(S3FileSystem, "call_s3", no_if_match)
    url = f"s3://{BUCKET}/noifmatch"
    with RemotePrefix(url).lock(_manifest(six_images, url)):
        assert s3.exists(f"{BUCKET}/noifmatch/{LOCK_NAME}")
    assert not s3.exists(f"{BUCKET}/noifmatch/{LOCK_NAME}")


@pytest.mark.parametrize("failure", [RemoteError("s3://x: failed after 4 tries"), KeyboardInterrupt()])
def test_a_lock_whose_read_back_fails_is_removed(s3, six_images, monkeypatch, failure):
    """The create succeeded, the read-back did not (or Ctrl-C came): the build stops without leaving its lock."""
    url = f"s3://{BUCKET}/readback"
    a = RemotePrefix(url)
    calls = []
    real = a._read_lock
    monkeypatch.setattr(a, "_read_lock", lambda: real() if calls.append(1) or len(calls) > 1 else _raise(failure))
    with pytest.raises(BuildError if isinstance(failure, RemoteError) else KeyboardInterrupt), \
            a.lock(_manifest(six_images, url)):
        pass
    assert len(calls) == 2 and not s3.exists(f"{BUCKET}/readback/{LOCK_NAME}")


def _raise(exc: BaseException):
    raise exc


def test_the_lock_write_is_conditional(s3, six_images):
    """The store refuses the second write of the lock (If-None-Match): a plain write would replace the first
    build's lock, read back as the second's own, and let both build."""
    url = f"s3://{BUCKET}/race"
    m = _manifest(six_images, url)
    first, second = RemotePrefix(url), RemotePrefix(url)
    with first.lock(m):
        lock = json.loads(s3.cat_file(f"{BUCKET}/race/{LOCK_NAME}"))
        with pytest.raises(BuildError, match="another build"), second.lock(m):
            pass
        assert json.loads(s3.cat_file(f"{BUCKET}/race/{LOCK_NAME}")) == lock  # not overwritten
    assert not s3.exists(f"{BUCKET}/race/{LOCK_NAME}")  # released by its holder only
    assert set(lock) == {"host", "pid", "since", "token", "dataset"}


def test_a_missing_bucket_is_one_line(s3, six_images):
    # (botocore's NoSuchBucket, or distillkit.remote's "no such bucket" once it classifies botocore's 404s)
    with pytest.raises(BuildError, match="(?i)s3://no-such-bucket/x/.distillkit.lock: .*no ?such ?bucket"):
        build(_manifest(six_images, "s3://no-such-bucket/x"), progress=False)


def test_a_prefix_of_another_dataset_is_refused_and_stale_shards_go(s3, six_images, built):
    url = _copy_prefix(s3, "built", "other")
    before = _objects(s3, "other")
    with pytest.raises(BuildError, match="holds the dataset 'demo-uniseg', not 'other'"):
        build(_manifest(six_images, url, "name=other"), progress=False)
    assert _objects(s3, "other") == before  # refused before anything changed
    # Three images per shard: two shards, and the third of the old plan (tar and record) is removed.
    result = build(_manifest(six_images, url, "output.samples_per_shard=3"), progress=False)
    assert result.built_shards == 2
    assert sorted(_objects(s3, "other")) == ["demo-uniseg-000000.json", "demo-uniseg-000000.tar",
                                             "demo-uniseg-000001.json", "demo-uniseg-000001.tar", "index.json"]


def test_a_killed_workers_unfinished_uploads_are_aborted_page_by_page(s3, six_images, built, monkeypatch):
    """Only this prefix's uploads are listed (``Prefix``), every page (a store returns 1000 at most; here one per
    page: moto ignores ``MaxUploads``, so the pages are cut from its answer by the markers, as S3 does)."""
    from s3fs import S3FileSystem

    from distillkit.pipelines import output_s3

    url = _copy_prefix(s3, "built", "mpu")
    for key in ("mpu/demo-uniseg-000001.tar", "mpu/demo-uniseg-000002.json", "mpu/index.json",
                "mpu/somebody-else.tar", "mpu-b/demo-uniseg-000001.tar"):  # the last two not this dataset's
        s3.call_s3("create_multipart_upload", Bucket=BUCKET, Key=key)
    asked = []
    real = S3FileSystem.call_s3

    def paged(self, method, *args, **kwargs):
        if method != "list_multipart_uploads":
            return real(self, method, *args, **kwargs)
        asked.append(kwargs)
        out = real(self, method, Bucket=kwargs["Bucket"], Prefix=kwargs["Prefix"])
        after = (kwargs.get("KeyMarker", ""), kwargs.get("UploadIdMarker", ""))
        rest = sorted((u for u in out.get("Uploads", []) if (u["Key"], u["UploadId"]) > after),
                      key=lambda u: (u["Key"], u["UploadId"]))
        page = rest[:kwargs["MaxUploads"]]
        more = len(rest) > len(page)
        return {"Uploads": page, "IsTruncated": more, **({"NextKeyMarker": page[-1]["Key"],
                                                          "NextUploadIdMarker": page[-1]["UploadId"]} if more else {})}

    monkeypatch.setattr(S3FileSystem, "call_s3", paged)
    monkeypatch.setattr(output_s3, "UPLOADS_PAGE", 1)
    build(_manifest(six_images, url), progress=False)
    monkeypatch.undo()
    assert {a["Prefix"] for a in asked} == {"mpu/"} and len(asked) >= 4  # paged, at the start and at the end
    assert sorted(u["Key"] for u in s3.list_multipart_uploads(BUCKET)) == ["mpu-b/demo-uniseg-000001.tar",
                                                                          "mpu/somebody-else.tar"]
    for upload in s3.list_multipart_uploads(BUCKET):
        s3.abort_mpu(BUCKET, upload["Key"], upload["UploadId"])


def test_a_refused_upload_listing_is_one_warning(s3, six_images, built, monkeypatch, caplog):
    """A policy scoped to the prefix often lacks s3:ListBucketMultipartUploads: the build still finishes (and
    publishes index.json), with one warning."""
    from botocore.exceptions import ClientError
    from s3fs import S3FileSystem

    url = _copy_prefix(s3, "built", "denied")
    real = S3FileSystem.call_s3

    def denied(self, method, *args, **kwargs):
        if method == "list_multipart_uploads":
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "ListMultipartUploads")
        return real(self, method, *args, **kwargs)

    monkeypatch.setattr(S3FileSystem, "call_s3", denied)
    # (s3fs's own listing too, which the build used before listing by prefix)
    monkeypatch.setattr(S3FileSystem, "list_multipart_uploads", lambda *a, **k: denied(None, "list_multipart_uploads"))
    result = build(_manifest(six_images, url), progress=False)
    assert result.reused_shards == 3 and s3.exists(f"{BUCKET}/denied/index.json")
    warnings = [r for r in caplog.records if "multipart uploads" in r.getMessage()]
    assert len(warnings) == 1 and "access denied" in warnings[0].getMessage()


def test_a_build_on_a_dask_cluster_writes_the_same_bytes(s3, six_images, built, local_dir):
    """Workers in processes of their own (an embedded LocalCluster) inherit the endpoint and credentials."""
    url = f"s3://{BUCKET}/cluster"
    m = _manifest(six_images, url, "cluster.scheduler=", "cluster.workers=2")
    assert build(m, progress=False).built_shards == 3
    _same_as_local(_objects(s3, "cluster"), local_dir, url, ignore=("cluster",))


def test_the_built_prefix_reads_back(s3, built, local_dir):
    import distillkit

    remote_samples = list(distillkit.open_shards(f"s3://{BUCKET}/built"))
    local_samples = list(distillkit.open_shards(local_dir))
    assert [s["__key__"] for s in remote_samples] == [s["__key__"] for s in local_samples] == \
        [key for p in sorted(local_dir.glob("*.tar")) for key, _ in iter_samples(p)]
    assert remote_samples[0]["__url__"].startswith(f"s3://{BUCKET}/built/")


def test_a_file_url_is_a_local_folder(tmp_path):
    assert isinstance(output_location(f"file://{tmp_path}/out"), LocalFolder)
    assert output_location(f"file://{tmp_path}/out").path == tmp_path / "out"
    assert isinstance(output_location(tmp_path), LocalFolder)


def test_a_url_folded_by_pathlib_is_refused(six_images, tmp_path):
    m = _manifest(six_images, tmp_path / "out")
    with pytest.raises(ManifestError, match="output.dir: s3:/shards/x looks like a URL that lost the second slash"):
        LocalFolder(Path("s3://shards/x")).prepare(m)


@pytest.mark.parametrize("url", ["nosuch://bucket/x", "memory://bucket/x", "http://127.0.0.1:1/x"])
def test_a_protocol_a_build_cannot_write_is_one_line(six_images, url):
    """Only S3 is written to (memory:// would vanish with the process, http:// has no writes): refused before
    anything is tried, saying what can be written."""
    started = time.monotonic()
    result = CliRunner().invoke(main, ["build", "demo-uniseg", "--quiet", f"--set=source.root={six_images}",
                                       f"--set=output.dir={url}", *[f"--set={s}" for s in SETS]])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "output.dir" in result.output, \
        result.output
    assert len(result.output.strip().splitlines()) == 1 and "s3://" in result.output, result.output
    assert time.monotonic() - started < 5  # no retries


def test_a_file_url_inside_the_source_is_refused(six_images):
    with pytest.raises(ManifestError, match="output.dir: .* lies inside the source source.root="):
        _manifest(six_images, f"file://{six_images}/out")
    _manifest(six_images, f"file://{six_images.parent}/elsewhere")  # outside: accepted


def test_stale_scratch_folders_are_swept(tmp_path, monkeypatch):
    """A SIGKILLed serial writer leaves its scratch folder (up to a whole shard): folders of ours untouched for a
    day go; in a dask worker the worker's own directory is used (purged by distributed when the worker dies)."""
    import os
    from types import SimpleNamespace

    import distributed

    from distillkit.pipelines import output_s3

    old, fresh, other = (tmp_path / n for n in ("distillkit-shard-old", "distillkit-shard-new", "unrelated"))
    for folder in (old, fresh, other):
        folder.mkdir()
        (folder / "x.tar").write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    for path in (old / "x.tar", old, other / "x.tar", other):
        os.utime(path, (two_days_ago, two_days_ago))
    assert output_s3.sweep_scratch(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distillkit-shard-new", "unrelated"]
    monkeypatch.setattr(distributed, "get_worker", lambda: SimpleNamespace(local_directory=str(tmp_path)))
    assert output_s3._scratch_root() == str(tmp_path)
