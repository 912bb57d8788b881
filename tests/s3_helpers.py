"""An S3-compatible server for tests: moto's, on 127.0.0.1, with the environment a user would set."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import free_port


def s3_env(mp: pytest.MonkeyPatch, port: int) -> None:
    """Credentials and endpoint as a user sets them: botocore reads ``AWS_ENDPOINT_URL`` for every client, s3fs's
    included (and dask workers started from this process inherit it)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        mp.setenv(key, value)


@contextmanager
def moto_s3(bucket: str) -> Iterator:
    """moto's S3 server on a free port of 127.0.0.1 holding one empty ``bucket``; yields the s3fs filesystem."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets in this process's memory, shared by every server it starts: another module's server
    # (in the same xdist worker) would leave its buckets behind
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    with pytest.MonkeyPatch.context() as mp:
        s3_env(mp, port)
        # fsspec caches filesystems by their arguments, not the environment: another server's may be cached
        S3FileSystem.clear_instance_cache()
        try:
            fs = S3FileSystem()
            fs.mkdir(bucket)
            yield fs
        finally:
            S3FileSystem.clear_instance_cache()
            server.stop()
