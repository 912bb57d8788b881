"""Shards beyond the local disk (issue 24): one epoch of ``open_shards`` over ``file://``, Python's HTTP server and an
S3-compatible server (moto) against the same folder read locally; and a build into that S3 server against the same
build into a local folder, then its rerun with every shard reused.

Both servers run on 127.0.0.1 on this machine: moto as a process of its own (``moto_server``, so it does not share
the interpreter that reads), the HTTP server in a thread. The figures are the cost of the remote path itself (fsspec,
requests, the temporary file and upload of a build), not of a network: a real store adds its own latency and
bandwidth. The reading data is 8 shards of 16 MiB (4 samples of 4 MiB random bytes, read with ``images="raw"``, so
nothing is decoded and the figure is I/O plus the sha256 every shard gets); the build is the demo's audio manifest.

    .venv/bin/python bench/run.py --device cpu --only remote
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.suite.common import Context, Figure, Result

TITLE = "Shards in object storage and over HTTP (servers on 127.0.0.1)"
BUCKET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server():
    """moto's S3 server as a process on 127.0.0.1, the environment s3fs reads pointed at it, one bucket."""
    port = _free_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > end:
                raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port}")
            time.sleep(0.1)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def http_server(root: Path):
    """Python's HTTP server over ``root`` in a thread on 127.0.0.1; yields its base URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # one line per request would drown the suite's output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Quiet(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _big_shards(folder: Path, shards: int, per_shard: int, sample_bytes: int) -> Path:
    import numpy as np

    from distillkit.pipelines.shards import index_for_tars, write_json_atomic, write_shard

    if not (folder / "index.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(shards):
            write_shard(folder / f"big-{i:06d}.tar",
                        [(f"s{i}x{j}", {"blob.bin": rng.bytes(sample_bytes)}) for j in range(per_shard)])
        write_json_atomic(folder / "index.json", index_for_tars(folder, "uniseg"))
    return folder


def _epoch_s(source) -> float:
    import distillkit

    t = time.perf_counter()
    n = sum(1 for _ in distillkit.open_shards(source, images="raw"))
    assert n > 0
    return time.perf_counter() - t


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run(ctx: Context) -> Result:
    import logging

    from distillkit.pipelines.catalog import load_manifest
    from distillkit.pipelines.runner import build
    from distillkit.sensors.synth.audio import make_audio

    repeats = 3 if ctx.quick else 5
    shards, per_shard, sample_mib = (4, 2, 4) if ctx.quick else (8, 4, 4)
    work = ctx.scratch("remote")
    data = _big_shards(work / "big", shards, per_shard, sample_mib << 20)
    size_mib = sum(p.stat().st_size for p in data.glob("*.tar")) / 2**20
    res = Result(TITLE, extra={"shards": shards, "shard_mib": per_shard * sample_mib, "repeats": repeats})
    quiet = logging.getLogger("distillkit")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "no records" notes of every epoch are not the figure
    try:
        with s3_server() as fs, http_server(work) as http:
            fs.put(str(data), f"{BUCKET}/big", recursive=True)
            sources = {"file://": f"file://{data}", "HTTP (http.server)": f"{http}/big/",
                       "S3 (moto)": f"s3://{BUCKET}/big"}
            times: dict[str, list[float]] = {k: [] for k in ("local", *sources)}
            for src in [data, *sources.values()]:
                _epoch_s(src)  # warm: imports, connections, page cache
            for _ in range(repeats):  # alternated, so that a slower moment of the machine hits every source alike
                for name, src in [("local", data), *sources.items()]:
                    times[name].append(_epoch_s(src))
            local = _median(times["local"])
            for name in sources:
                t = _median(times[name])
                res.figures.append(Figure(f"one epoch, {shards} shards, {size_mib:.0f} MiB, from {name}", t, "s",
                                          "the same folder read locally", local,
                                          note=f"{size_mib / t:.0f} MiB/s against {size_mib / local:.0f}"))

            audio = make_audio(work / "audio", seed=0, size="small" if ctx.quick else "demo")

            def timed(out: str) -> tuple[float, float]:
                m = lambda: load_manifest("demo-audio", [f"source.root={audio}", f"output.dir={out}",  # noqa: E731
                                                         "cluster.scheduler=serial"])
                t0 = time.perf_counter()
                first = build(m(), progress=False)
                t1 = time.perf_counter()
                again = build(m(), progress=False)
                assert first.reused_shards == 0 and again.built_shards == 0, (first, again)
                return t1 - t0, time.perf_counter() - t1

            timed(str(work / "build-warm"))  # warm: the first build in a process pays the pipeline's imports
            shutil.rmtree(work / "build-warm")
            builds: dict[str, list[tuple[float, float]]] = {"local": [], "s3": []}
            for i in range(max(1, repeats // 2)):
                local_dir = work / f"build-{i}"
                shutil.rmtree(local_dir, ignore_errors=True)
                builds["local"].append(timed(str(local_dir)))
                shutil.rmtree(local_dir)
                builds["s3"].append(timed(f"s3://{BUCKET}/build-{i}"))
                fs.rm(f"{BUCKET}/build-{i}", recursive=True)
            for what, k in (("build of the demo's audio manifest (serial)", 0), ("its rerun, every shard reused", 1)):
                res.figures.append(Figure(f"{what}, into S3 (moto)", _median([b[k] for b in builds["s3"]]), "s",
                                          "into a local folder", _median([b[k] for b in builds["local"]])))
    finally:
        quiet.setLevel(level)
    res.notes.append("servers on this machine: the cost of the remote path (fsspec, requests, sha256, upload), not of "
                     "a network")
    return res
