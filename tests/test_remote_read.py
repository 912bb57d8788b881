"""Shards read from URLs (issue 24 item 1): ``s3://`` (moto's S3 server), ``http://`` (Python's HTTP server) and
``file://``, with the same integrity checks as a local folder and one-line errors, against servers started here on
127.0.0.1 (module-scoped: one build, one HTTP server, one S3 server for the whole module)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import distillkit
from distillkit import remote
from distillkit.pipelines.cli import main
from distillkit.pipelines.shards import BadIndex
from distillkit.train.streaming import CorruptShard
from tests.conftest import build_serial, free_port
from tests.s3_helpers import moto_s3, s3_env

PROTOCOLS = ("http", "s3", "file")
SHARD0 = "demo-uniseg-000000.tar"


class _Handler(SimpleHTTPRequestHandler):
    """Files with range requests (Python's own handler ignores ``Range``) and an ``ETag`` (a digest of the bytes),
    and faults a test asks for by URL path: ``drop_once`` (send that many bytes of the body, then close the
    connection, once), ``fail`` (always 503), ``deny`` (403), ``norange`` (ignore ``Range``: the whole object, 200),
    ``no_length`` (no ``Content-Length``: ``"get"`` on reads, a close-delimited body; ``"probe"`` on HEADs and
    fsspec's size probes only: no size is known, the body has one),
    ``swap`` (after a drop, the file's bytes become these). ``requests`` logs ``(method, path, first byte asked
    for)``."""

    drop_once: dict[str, int] = {}
    fail: set[str] = set()
    deny: set[str] = set()
    norange: set[str] = set()
    no_length: dict[str, str] = {}
    swap: dict[str, bytes] = {}
    drop_wait_s = 0.5
    requests: list[tuple[str, str, int]] = []

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path, local = self.path.split("?", 1)[0], self.translate_path(self.path)
        if path in self.deny:
            return self.send_error(403)
        if path in self.fail:
            return self.send_error(503)
        if not os.path.isfile(local):
            return self.send_error(404)
        data = Path(local).read_bytes()
        start, end, status = 0, len(data), 200
        if (rng := self.headers.get("Range")) is not None and path not in self.norange:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start, end, status = int(first), min(len(data), int(last) + 1 if last else len(data)), 206
        self.requests.append((self.command, path, start))
        self.send_response(status)
        # fsspec's size probes (a GET when a HEAD gave no size) ask for identity encoding; a read does not.
        probe = not body or self.headers.get("Accept-Encoding") == "identity"
        if self.no_length.get(path) != ("probe" if probe else "get"):
            self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()[:16]}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return None
        cut = None if probe else self.drop_once.pop(path, None)  # a probe is served whole: the drop hits the read
        if cut is not None:  # a connection dropped mid-shard: part of the body, then the socket closes
            self.wfile.write(data[start:start + cut])
            self.wfile.flush()
            # the client reads these bytes before the drop (else it resumes at 0, as it should: aiohttp drops bytes
            # still unread when the connection's loss reaches it first)
            time.sleep(self.drop_wait_s)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            if path in self.swap:  # the object replaced while the client was reading it
                Path(local).write_bytes(self.swap.pop(path))
            return None
        self.wfile.write(data[start:end])
        return None


@pytest.fixture(scope="module")
def root(six_images, tmp_path_factory) -> Path:
    """A folder of shard folders, served by every server: ``clean`` (three uniseg shards, about 1 s to build),
    ``corrupt`` (one byte of a shard flipped), ``climb`` (an index listing ``../x.tar``), ``gone`` (a shard
    removed)."""
    top = tmp_path_factory.mktemp("served")
    clean = build_serial("demo-uniseg", top / "clean", f"source.root={six_images}", "output.samples_per_shard=2")
    for name in ("corrupt", "climb", "gone"):
        shutil.copytree(clean, top / name)
    data = bytearray((top / "corrupt" / SHARD0).read_bytes())
    data[len(data) // 2] ^= 0x01
    (top / "corrupt" / SHARD0).write_bytes(bytes(data))
    index = json.loads((top / "climb" / "index.json").read_text())
    index["shards"][0]["file"] = "../x.tar"
    (top / "climb" / "index.json").write_text(json.dumps(index))
    (top / "gone" / SHARD0).unlink()
    return top


@pytest.fixture(scope="module")
def http_base(root):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()),
                                 lambda *a: _Handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_bucket(root):
    """moto's S3 server with ``root`` uploaded to bucket ``shards``. Credentials and endpoint through the
    environment, as a user sets them (``AWS_ENDPOINT_URL`` is botocore's, which s3fs's client honours)."""
    with moto_s3("shards") as fs:
        fs.pipe({f"shards/{p.relative_to(root).as_posix()}": p.read_bytes() for p in root.rglob("*") if p.is_file()})
        yield "s3://shards"


@pytest.fixture(params=PROTOCOLS)
def url_of(request, root):
    """``url_of(folder)``: the URL of ``root/folder`` over the protocol of the test's parameter."""
    protocol = request.param
    if protocol == "http":
        base = request.getfixturevalue("http_base")
        return lambda folder: f"{base}/{folder}/"
    if protocol == "s3":
        base = request.getfixturevalue("s3_bucket")
        return lambda folder: f"{base}/{folder}"
    return lambda folder: f"file://{root}/{folder}"


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BASE_DELAY_S", 0.01)
    _Handler.drop_once, _Handler.fail, _Handler.deny, _Handler.norange = {}, set(), set(), set()
    _Handler.no_length, _Handler.swap = {}, {}
    _Handler.requests.clear()


def _content(source: str | Path) -> dict[str, dict[str, bytes]]:
    """Every sample's fields as bytes (arrays by their bytes, dtype and shape), by key."""
    out = {}
    for sample in distillkit.open_shards(source, images="raw"):
        out[sample["__key__"]] = {k: (v.tobytes() + str((v.dtype, v.shape)).encode() if isinstance(v, np.ndarray)
                                      else json.dumps(v).encode() if isinstance(v, (dict, list)) else bytes(v))
                                  for k, v in sample.items() if not k.startswith("__")}
    return out


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result, *parts: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- same samples, same checks


def test_open_shards_over_a_url_gives_the_local_samples_checked(url_of, root):
    url = url_of("clean")
    ds = distillkit.open_shards(url)
    assert ds.shards == [remote.join(url, s["file"]) for s in json.loads((root / "clean/index.json").read_text())
                         ["shards"]]
    assert set(ds.records) == set(ds.shards)  # every shard is hashed against its record while streaming
    local = _content(root / "clean")
    assert len(local) == 6 and _content(url) == local


def test_verify_stats_show_on_a_url(url_of, tmp_path):
    url = url_of("clean")
    r = _cli("verify", url)
    assert r.exit_code == 0, r.output
    assert "3 shards, 6 samples, 0 faults" in r.output
    if url.startswith("http"):  # plain HTTP has no listing: said in one line, not skipped silently
        assert [ln for ln in r.output.splitlines() if "gives no listing" in ln][0].startswith("NOT CHECKED")
    else:
        assert "gives no listing" not in r.output
    r = _cli("stats", url)
    assert r.exit_code == 0 and "shards: 3  samples: 6" in r.output, r.output
    r = _cli("show", url, "--out", str(tmp_path / "s.png"))
    assert r.exit_code == 0 and (tmp_path / "s.png").stat().st_size > 0, r.output


@pytest.mark.parametrize("url_of", ["s3", "file"], indirect=True)  # plain HTTP lists nothing (tested above)
def test_verify_lists_stray_files_where_the_protocol_lists(url_of, root):
    url = url_of("clean")
    stray = ".demo-uniseg-000001.tar.tmp-abc"
    if url.startswith("s3"):
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.pipe(f"shards/clean/{stray}", b"x")
        try:
            r = _cli("verify", url)
        finally:
            fs.rm(f"shards/clean/{stray}")
    else:
        (root / "clean" / stray).write_bytes(b"x")
        try:
            r = _cli("verify", url)
        finally:
            (root / "clean" / stray).unlink()
    assert r.exit_code == 1 and f"FAULT {stray}: stray temporary file" in r.output, r.output


def test_train_reads_a_url(url_of, tmp_path):
    url = url_of("clean")
    # A loader worker process: fsspec's clients (their event-loop thread, their sessions) must work after the fork.
    r = _cli("train", "uniseg", "--shards", url, "--max-steps", "2", "--batch-size", "2", "--num-workers", "1",
             "--out", str(tmp_path / "run"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "latest.pt").is_file()


def test_a_flipped_byte_is_a_corrupt_shard_and_a_fault(url_of):
    url = url_of("corrupt")
    with pytest.raises(CorruptShard, match=rf"{SHARD0}: corrupt shard"):
        _content(url)
    r = _cli("verify", url)
    assert r.exit_code == 1 and f"FAULT {SHARD0}: sha256 differs from index.json" in r.output, r.output


def test_an_index_that_climbs_out_is_refused(url_of):
    url = url_of("climb")
    with pytest.raises(BadIndex, match=r"index\.json: shards\[0\]\.file '\.\./x\.tar' is not a file name"):
        distillkit.open_shards(url)
    _one_line_error(_cli("verify", url), "index.json", "'../x.tar'")


# --------------------------------------------------------------------------- one-line errors, retries


def test_a_missing_folder_or_shard_is_one_line(url_of, tmp_path):
    url = url_of("nowhere")
    with pytest.raises(FileNotFoundError, match="no index.json"):
        distillkit.open_shards(url)
    _one_line_error(_cli("stats", url), remote.join(url, "index.json"), "no index.json")
    _one_line_error(_cli("train", "uniseg", "--shards", url, "--max-steps", "1", "--out", str(tmp_path / "r")),
                    "no index.json")
    gone = url_of("gone")  # listed in index.json, absent: streaming stops on it, verify names it
    with pytest.raises(remote.RemoteNotFound, match=rf"{SHARD0}: no such object"):
        _content(gone)
    r = _cli("verify", gone)
    assert r.exit_code == 1 and f"FAULT {SHARD0}: missing" in r.output, r.output


def test_a_wrong_credential_is_one_line(s3_bucket, http_base, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys from now on: ours is unknown
    _one_line_error(_cli("stats", f"{s3_bucket}/clean"), f"{s3_bucket}/clean/index.json", "access denied")
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    _Handler.deny = {f"/clean/{SHARD0}"}
    with pytest.raises(remote.RemoteDenied, match=rf"{SHARD0}: access denied"):
        _content(f"{http_base}/clean/")


def test_a_server_down_is_one_line_after_the_retries(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/shards/"  # nothing listens there
    tries = []
    real = remote._transient
    monkeypatch.setattr(remote, "_transient", lambda exc: tries.append(exc) or real(exc))
    line = _one_line_error(_cli("verify", url), remote.join(url, "index.json"),
                           f"failed after {remote.RETRY_ATTEMPTS} tries")
    assert "ClientConnectorError" in line and len(tries) >= remote.RETRY_ATTEMPTS


def test_a_connection_dropped_mid_shard_is_resumed_at_its_offset(http_base, root):
    url = f"{http_base}/clean/"
    _Handler.drop_once = {f"/clean/{SHARD0}": 3000}
    assert _content(url) == _content(root / "clean")
    reads = [start for method, path, start in _Handler.requests if method == "GET" and path == f"/clean/{SHARD0}"]
    assert len(reads) == 2 and reads[0] == 0 and 0 < reads[1] <= 3000, reads  # continued where the first broke


def test_a_shard_that_always_fails_ends_in_one_line_after_bounded_retries(http_base, tmp_path):
    _Handler.fail = {f"/clean/{SHARD0}"}
    with pytest.raises(remote.RemoteError, match=rf"{SHARD0}: failed after {remote.RETRY_ATTEMPTS} tries") as err:
        _content(f"{http_base}/clean/")
    assert "\n" not in str(err.value)
    r = _cli("train", "uniseg", "--shards", f"{http_base}/clean/", "--max-steps", "2", "--batch-size", "2",
             "--set", "num_workers=0", "--out", str(tmp_path / "run"))
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert r.exit_code == 2 and len(errors) == 1 and r.output.rstrip().endswith(errors[0]), r.output
    assert f"{SHARD0}: failed after {remote.RETRY_ATTEMPTS} tries" in errors[0]


@pytest.mark.parametrize("url_of", ["s3"], indirect=True)  # one protocol: the readers are those tested above
def test_eval_reads_a_url(url_of, tmp_path):
    url = url_of("clean")
    r = _cli("train", "uniseg", "--shards", url, "--max-steps", "1", "--batch-size", "2", "--out",
             str(tmp_path / "run"))
    assert r.exit_code == 0, r.output
    r = _cli("eval", "uniseg", "--checkpoint", str(tmp_path / "run" / "latest.pt"), "--shards", url, "--epochs", "1",
             "--size", "32")
    assert r.exit_code == 0, r.output
    assert "distilled" in r.output


# --------------------------------------------------------------------------- review of issue 24 item 1 (rfix)


def _copy(root: Path, name: str) -> Path:
    """A fresh copy of ``clean`` named ``name`` (served live by the HTTP server, reachable over ``file://``)."""
    shutil.rmtree(root / name, ignore_errors=True)
    return Path(shutil.copytree(root / "clean", root / name))


@pytest.mark.parametrize("name", ["%2e%2e%2fsecret.tar", "x.tar?y=1", "x.tar#y"])
def test_a_shard_name_a_url_decodes_is_refused(http_base, root, name):
    # "%2e%2e%2fsecret.tar" is a plain file name on disk; in a URL the server decodes it to "../secret.tar".
    folder = _copy(root, "escape")
    index = json.loads((folder / "index.json").read_text())
    index["shards"][0]["file"] = name
    (folder / "index.json").write_text(json.dumps(index))
    for source in (folder, f"{http_base}/escape/"):
        with pytest.raises(BadIndex, match=r"shards\[0\]\.file .* is not a file name of this folder"):
            distillkit.open_shards(source)
    _one_line_error(_cli("verify", f"{http_base}/escape/"), "index.json", "is not a file name")


def test_a_symlink_out_of_a_file_url_folder_is_refused(root):
    folder = _copy(root, "linked")
    (folder / SHARD0).unlink()
    (folder / SHARD0).symlink_to(root / "clean" / SHARD0)  # the same bytes, outside the folder
    for source in (folder, f"file://{folder}"):
        with pytest.raises(BadIndex, match=rf"'{SHARD0}' is a symlink to .*, outside the folder"):
            distillkit.open_shards(source)
    _one_line_error(_cli("verify", f"file://{folder}"), "is a symlink", code=2)


def test_missing_s3_credentials_are_one_line(s3_bucket, monkeypatch, tmp_path):
    import s3fs

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup (no network in tests)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client holds the keys it was made with
    try:
        _one_line_error(_cli("stats", f"{s3_bucket}/clean"), "index.json", "no credentials found",
                        "AWS_ACCESS_KEY_ID")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("fault", ["norange", "no_length"])
def test_a_drop_that_cannot_be_resumed_is_one_line(http_base, fault, monkeypatch):
    # After a dropped connection the read continues with a range request: a server that ignores it (answers the
    # whole object), or one whose HEAD gave no size (fsspec then opens an unseekable stream), cannot resume there.
    path = f"/clean/{SHARD0}"
    _Handler.drop_once = {path: 3000}
    # the read must be past byte 0 when the connection drops (a drop at 0 resumes with a plain GET, which succeeds):
    # wait long enough for a loaded machine's client thread to take the first bytes
    monkeypatch.setattr(_Handler, "drop_wait_s", 3.0)
    if fault == "norange":
        _Handler.norange = {path}
        expect = "the server ignores range requests"
    else:
        _Handler.no_length = {path: "probe"}
        expect = "the server gives no size"
    with pytest.raises(remote.RemoteError, match=rf"{SHARD0}: connection dropped at byte \d+; {expect}"):
        _content(f"{http_base}/clean/")
    # verify says it in one line, exit 2. (Its reader may not have taken a byte when the drop comes: then the read
    # resumes at 0 with a plain GET, which any server answers, and verify is clean; on a loaded machine that
    # happens now and then, so either outcome is accepted here, and the message is checked whenever it comes.)
    _Handler.drop_once = {path: 3000}
    result = _cli("verify", f"{http_base}/clean/")
    if result.exit_code != 0:
        _one_line_error(result, SHARD0, expect)


def test_a_close_delimited_body_cut_short_is_resumed(http_base, root):
    # No Content-Length on the GET: the cut reads as a clean end of the body; the size the HEAD gave says it is not.
    path = f"/clean/{SHARD0}"
    _Handler.drop_once, _Handler.no_length = {path: 3000}, {path: "get"}
    assert _content(f"{http_base}/clean/") == _content(root / "clean")
    reads = [start for method, p, start in _Handler.requests if method == "GET" and p == path]
    assert len(reads) == 2 and 0 < reads[1] <= 3000, reads


def test_an_object_replaced_while_read_is_refused(http_base, root):
    folder = _copy(root, "swapped")
    path = f"/swapped/{SHARD0}"
    _Handler.drop_once = {path: 3000}
    _Handler.swap = {path: (folder / "demo-uniseg-000001.tar").read_bytes()}  # another shard's bytes
    with pytest.raises(remote.RemoteError, match=rf"{SHARD0}: changed while being read"), \
            remote.open_read(f"{http_base}{path}") as f:
        f.read()


def test_shard_urls_one_by_one_pre_signed_or_beside_a_refused_index_stream_unchecked(http_base, root, caplog):
    one = _content(root / "clean" / SHARD0)
    presigned = f"{http_base}/clean/{SHARD0}?X-Amz-Signature=abc&X-Amz-Expires=60"
    assert _content(presigned) == one  # a shard, not a folder ".../x.tar?...": no ".../x.tar?.../index.json"
    _Handler.deny = {"/clean/index.json"}  # a server that serves the shards and not the folder's other objects
    ds = distillkit.open_shards([f"{http_base}/clean/{SHARD0}"])
    assert ds.records == {} and "stream unchecked" in caplog.text
    assert _content([f"{http_base}/clean/{SHARD0}"]) == one


def test_two_entries_sharing_a_record_are_faults_not_a_crash(http_base, root):
    folder = _copy(root, "twin")
    twin = SHARD0.removesuffix(".tar")  # its record is demo-uniseg-000000.json too
    shutil.copy(folder / SHARD0, folder / twin)
    index = json.loads((folder / "index.json").read_text())
    index["shards"].append({**index["shards"][0], "file": twin})
    index["counts"]["written"] += index["shards"][0]["samples"]
    index["counts"]["planned"] += index["shards"][0]["samples"]
    (folder / "index.json").write_text(json.dumps(index))
    url = f"{http_base}/twin/"
    with pytest.raises(BadIndex, match=rf"{twin}: file is '{twin}' in index.json, '{SHARD0}' in its record"):
        distillkit.open_shards(url)
    r = _cli("verify", url)
    assert r.exit_code == 1 and f"FAULT index.json: {twin}: file is" in r.output, r.output


def _silent_server() -> tuple[socket.socket, int]:
    """A socket that takes connections and never answers (a stalled server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, sock.getsockname()[1]


def test_a_stalled_server_fails_within_the_timeout(monkeypatch):
    sock, port = _silent_server()
    monkeypatch.setenv("DISTILLKIT_REMOTE_TIMEOUT_S", "0.3")
    monkeypatch.setattr(remote, "RETRY_ATTEMPTS", 2)
    done: list[BaseException] = []

    def read() -> None:
        try:
            remote.read_bytes(f"http://127.0.0.1:{port}/stalled/index.json")
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            done.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=read, daemon=True)  # fsspec's default (5 min a try) would outlive the test
    thread.start()
    thread.join(20)
    sock.close()
    assert done, "a silent server was waited for more than 20 s"
    assert isinstance(done[0], remote.RemoteError) and "failed after 2 tries" in str(done[0]), done[0]
    assert time.monotonic() - start < 10


def test_a_bad_timeout_setting_is_one_line(http_base, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_REMOTE_TIMEOUT_S", "soon")
    _one_line_error(_cli("stats", f"{http_base}/clean/"), "DISTILLKIT_REMOTE_TIMEOUT_S='soon'", "seconds > 0")


def test_an_s3_endpoint_that_refuses_is_tried_only_by_with_retries(monkeypatch):
    # botocore retried each refused request itself (5 attempts with backoff) under with_retries' 4: 36 s.
    import s3fs

    accepted = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def close_each() -> None:  # every connection closed before any answer: a failed request, counted
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=close_each, daemon=True).start()
    s3_env(monkeypatch, sock.getsockname()[1])
    s3fs.S3FileSystem.clear_instance_cache()
    start = time.monotonic()
    try:
        _one_line_error(_cli("stats", "s3://shards/clean"), "s3://shards/clean/index.json",
                        f"failed after {remote.RETRY_ATTEMPTS} tries")
    finally:
        sock.close()
        s3fs.S3FileSystem.clear_instance_cache()
    # One request per try; aiohttp resends an idempotent request once itself when the server hangs up before
    # answering (aiohttp/client.py, ``retry_persistent_connection``, RFC 9112): at most two connections a try.
    assert remote.RETRY_ATTEMPTS <= len(accepted) <= 2 * remote.RETRY_ATTEMPTS, accepted
    assert time.monotonic() - start < 10


def test_a_protocol_that_connects_on_creation_fails_in_one_line():
    url = f"ftp://127.0.0.1:{free_port()}/shards"  # fsspec's FTP filesystem connects in its constructor
    _one_line_error(_cli("stats", url), url, "Connection refused")


def test_a_start_fetches_each_shard_record_once(http_base, root):
    folder = _copy(root, "once")
    url = f"{http_base}/once/"
    from distillkit.pipelines.shards import load_index

    def record_gets() -> int:
        return sum(1 for method, p, _ in _Handler.requests if method == "GET" and p == "/once/demo-uniseg-000000.json")

    load_index(url)
    distillkit.open_shards(url)  # its shard list, then its records: the index is loaded again
    assert record_gets() == 1
    (folder / "index.json").write_text(json.dumps(json.loads((folder / "index.json").read_text()), indent=1))
    load_index(url)  # another index (a rebuild): its records are checked again
    assert record_gets() == 2


@pytest.mark.parametrize(("url", "folder"), [
    ("https://h/d/x.tar.gz", None), ("s3://b/x.tgz", None), ("s3://b/x.tar", None),  # one shard, compressed or not
    ("s3://b/prefix", "s3://b/prefix"), ("https://h/d/", "https://h/d"), ("s3://b/data.v1", "s3://b/data.v1"),
    ("https://h/d/index.json", "https://h/d"), ("s3://b/x.tar?X-Amz-Signature=a", None),
])
def test_which_urls_name_a_folder(url, folder):
    from distillkit.reading import _folder_url

    assert _folder_url(url) == folder


def test_user_http_options_reach_https_too(monkeypatch):
    """fsspec files FSSPEC_HTTP_* under "http" for https:// as well; the timeout distillkit adds must not drop a
    user's headers (a token) on https."""
    import fsspec.config

    from distillkit.remote import filesystem

    monkeypatch.setitem(fsspec.config.conf, "http", {"client_kwargs": {"headers": {"Authorization": "Bearer t"}}})
    for url in ("http://127.0.0.1:9/x/", "https://127.0.0.1:9/x/"):
        kwargs = filesystem(url)[0].client_kwargs
        assert kwargs["headers"] == {"Authorization": "Bearer t"} and "timeout" in kwargs, url
