"""Shards on object storage, for real: a local S3 server (moto) on loopback, reached through s3fs.

An image tree uploaded to S3 is written to S3 by 2 forked writer processes, verified there, and
read back by the train and eval loaders with 2 workers each; the shards must hold exactly what the
same write to a local directory holds. A missing S3 shard fails naming its URL.
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import time

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from shards import build_eval_loader, build_train_loader, verify_dataset, write_dataset, write_demo  # noqa: E402
from test_shards import SIMPLE, jpeg_bytes  # noqa: E402

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a loopback port, with the AWS environment pointing at it; yields an s3fs filesystem."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    previous = {key: os.environ.get(key) for key in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("shards-test")
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def shard_members(opener, names) -> dict[str, bytes]:
    members = {}
    for name in names:
        with opener(name) as f, tarfile.open(fileobj=io.BytesIO(f.read())) as archive:
            for member in archive.getmembers():
                members[member.name] = archive.extractfile(member).read()
    return members


def test_write_verify_and_read_on_s3_match_a_local_write(s3_server, tmp_path):
    tree = tmp_path / "tree"
    for c, name in enumerate(["cat", "dog", "owl"]):
        (tree / name).mkdir(parents=True)
        for i in range(10):
            (tree / name / f"{i}.jpg").write_bytes(jpeg_bytes(100 * c + i))
    s3_server.put(str(tree), "shards-test/tree", recursive=True)

    info = write_dataset("s3://shards-test/tree", "s3://shards-test/out", samples_per_shard=8, workers=2,
                         progress=False)
    local = write_dataset(str(tree), str(tmp_path / "local"), samples_per_shard=8, workers=2, progress=False)
    assert info["total"] == local["total"] == 30 and info["classes"] == ["cat", "dog", "owl"]
    assert [s["count"] for s in info["shards"]] == [s["count"] for s in local["shards"]]
    names = [s["name"] for s in info["shards"]]
    remote = shard_members(lambda n: s3_server.open(f"shards-test/out/{n}", "rb"), names)
    on_disk = shard_members(lambda n: open(tmp_path / "local" / n, "rb"), names)
    assert remote.keys() == on_disk.keys()
    for name, content in on_disk.items():
        if not name.endswith(".json"):  # json holds the source path, which differs
            assert remote[name] == content, name

    report = verify_dataset("s3://shards-test/out", workers=2, progress=False)
    assert report.ok and report.decoded == 30

    train = build_train_loader("s3://shards-test/out", batch_size=5, img_size=32, num_workers=2, augment=SIMPLE,
                               shuffle_buffer=4, return_keys=True)
    keys = [key for _, _, batch_keys in train for key in batch_keys]
    evaluation = build_eval_loader("s3://shards-test/out", batch_size=7, img_size=32, num_workers=2,
                                   return_keys=True)
    every_key = [key for _, _, batch_keys in evaluation for key in batch_keys]
    assert len(every_key) == len(set(every_key)) == 30  # each sample exactly once
    assert len(keys) == len(train) * 5 == 30 and set(keys) <= set(every_key)


def test_a_missing_s3_shard_fails_naming_its_url(s3_server, tmp_path):
    write_demo("s3://shards-test/demo", num_samples=40, samples_per_shard=20, progress=False)
    s3_server.rm("shards-test/demo/shard-000001.tar")
    loader = build_train_loader("s3://shards-test/demo", batch_size=8, img_size=32, num_workers=0, augment=SIMPLE)
    with pytest.raises(Exception, match="s3://shards-test/demo/shard-000001.tar"):
        list(loader)
