"""The artifact store against a local folder and a real SeaweedFS S3 server (no mocks)."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from s3server import SeaweedS3, closed_port

from job.infra.errors import StorageError
from job.infra.local_store import LocalStore, atomic_write
from job.infra.s3_store import S3Store, make_s3_client
from job.infra.stores import download_prefix, open_store
from job.infra.writer import BackgroundWriter
from tests.helpers import run_job
from tests.test_runlock import long_env, start, wait_for

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "runs" / "run-1"))
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/runs/run-1")


def test_round_trip(store, tmp_path):
    store.put_bytes("config.json", b"{}")
    store.put_bytes("config.json", b'{"a": 1}')  # overwrite
    assert store.get_bytes("config.json") == b'{"a": 1}'

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1000))
    store.put_file("final/generator.pt", src)
    store.get_file("final/generator.pt", tmp_path / "out" / "g.pt")
    assert (tmp_path / "out" / "g.pt").read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["g.pt"]  # no temp file left

    with pytest.raises(FileNotFoundError):
        store.get_bytes("missing")
    with pytest.raises(FileNotFoundError):
        store.get_file("missing", tmp_path / "missing")


def test_list_exists_delete_child(store):
    keys = ["eval.jsonl", "checkpoints/step-1/model.pt", "checkpoints/step-1/COMPLETE"]
    keys += ["checkpoints/step-2/model.pt", "samples/step-2.png"]
    for key in keys:
        store.put_bytes(key, key.encode())

    assert store.list() == sorted(keys)
    assert store.list("checkpoints/step-1/") == [
        "checkpoints/step-1/COMPLETE",
        "checkpoints/step-1/model.pt",
    ]
    assert store.list("checkpoints/step-") == sorted(k for k in keys if "step-" in k and "ch" in k)
    assert store.list("nothing/") == []
    assert store.list_sizes("samples/") == {"samples/step-2.png": len("samples/step-2.png")}
    assert store.exists("eval.jsonl") and not store.exists("checkpoints")

    store.delete("checkpoints/step-1/model.pt")
    store.delete("checkpoints/step-1/COMPLETE")
    store.delete("never/was")  # missing is fine
    assert store.list("checkpoints/") == ["checkpoints/step-2/model.pt"]

    ckpt = store.child("checkpoints")
    assert ckpt.uri == store.uri + "/checkpoints"
    assert ckpt.list() == ["step-2/model.pt"]
    ckpt.child("step-3").put_bytes("model.pt", b"3")
    assert store.get_bytes("checkpoints/step-3/model.pt") == b"3"


def test_check_passes_and_leaves_nothing(store):
    store.check()
    assert store.list() == []


def test_bad_keys_are_refused(store):
    for key in ("", "../escape", "a/../../b"):
        with pytest.raises(ValueError):
            store.put_bytes(key, b"x")


def test_local_store_paths_and_temp_files(tmp_path):
    store = LocalStore(tmp_path / "run")
    store.put_bytes("a/b.txt", b"1")
    assert store.local_path("a/b.txt") == tmp_path / "run" / "a" / "b.txt"
    (tmp_path / "run" / "a" / ".b.txt.0123abcd.partial").write_bytes(b"half")  # a crashed put
    assert store.list() == ["a/b.txt"]
    store.put_file("a/b.txt", store.local_path("a/b.txt"))  # same file: no-op
    assert store.get_bytes("a/b.txt") == b"1"
    store.delete("a/b.txt")
    store.delete("a/.b.txt.0123abcd.partial")
    assert not (tmp_path / "run" / "a").exists()  # emptied folders are pruned
    assert (tmp_path / "run").is_dir()


def test_check_spares_the_temp_file_of_a_write_in_progress(tmp_path):
    store = LocalStore(tmp_path / "run")
    halfway, finish = threading.Event(), threading.Event()

    def slow_write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        halfway.set()
        finish.wait(10)
        tmp.write_bytes(b"whole")

    dest = store.local_path("checkpoints/step-1/state.pt")
    writer = threading.Thread(target=atomic_write, args=(dest, slow_write))
    writer.start()
    assert halfway.wait(10)
    store.check()
    temps = list(dest.parent.glob(".state.pt.*.partial"))
    finish.set()
    writer.join()
    assert len(temps) == 1
    assert store.get_bytes("checkpoints/step-1/state.pt") == b"whole"


def test_a_rerun_removes_the_temp_files_a_killed_job_left_in_its_own_run(tmp_path):
    env = long_env(tmp_path)
    first = start(env)
    wait_for(first, "checkpoint at step 5 stored")
    first.kill()
    first.communicate(timeout=30)
    runs = tmp_path / "runs"
    left = runs / "shared/checkpoints/step-00000005/.state.pt.abcd1234.partial"
    others = [runs / ".x.abcd1234.partial", runs / "other/checkpoints/.state.pt.abcd1234.partial"]
    for path in (left, *others):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(MiB))
    rerun = run_job(dict(env, GAN_MAX_STEPS="8"))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from step" in rerun.stdout
    assert not list((runs / "shared").rglob("*.partial"))
    freed = re.search(r"removed (\d+) temp files .*: (\d+) bytes freed", rerun.stdout)
    assert freed and int(freed[2]) >= MiB, rerun.stdout
    assert all(path.exists() for path in others)  # the root and other runs are not this run's


def test_open_store_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_store("./runs").uri == str(tmp_path / "runs")
    assert (tmp_path / "runs").is_dir()
    assert open_store(f"file://{tmp_path}/x%20y").uri == str(tmp_path / "x y")
    s3 = open_store("s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket/some/prefix"
    assert s3.local_path("k") is None
    assert open_store("s3://bucket").uri == "s3://bucket"
    (tmp_path / "afile").write_text("")
    for bad in ("s3:///prefix", "gs://bucket/x", "file://host/x", str(tmp_path / "afile" / "x")):
        with pytest.raises(StorageError):
            open_store(bad)


def test_s3_client_settings(monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_S3_ADDRESSING_STYLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://from-env:9000")
    client = make_s3_client()
    assert client.meta.endpoint_url == "http://from-env:9000"
    assert client.meta.region_name == "us-east-1"
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.retries["mode"] == "standard"
    assert client.meta.config.retries["total_max_attempts"] == 5  # AWS_MAX_ATTEMPTS' default
    assert (client.meta.config.connect_timeout, client.meta.config.read_timeout) == (10, 60)

    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    client = make_s3_client("http://explicit:9000")  # GAN_S3_ENDPOINT_URL wins over the env
    assert client.meta.endpoint_url == "http://explicit:9000"
    assert client.meta.region_name == "eu-central-1"
    assert client.meta.config.retries["mode"] == "adaptive"


def test_s3_large_put_file_is_multipart(s3_env, s3_bucket, tmp_path):
    store = open_store(f"s3://{s3_bucket}/run")
    store.transfer = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=5 * MiB)
    parts = []
    store.client.meta.events.register("before-call.s3.UploadPart", lambda **kw: parts.append(1))

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * MiB))
    store.put_file("checkpoints/step-1/state.pt", big)
    assert len(parts) == 4
    assert store.list_sizes() == {"checkpoints/step-1/state.pt": 20 * MiB}
    store.get_file("checkpoints/step-1/state.pt", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_check_wrong_secret_says_access_denied(s3_env, s3_bucket, monkeypatch):
    secret = "wrong-secret-Zq81xK"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(StorageError) as info:
        open_store(f"s3://{s3_bucket}/run").check()
    message = str(info.value)
    assert "access denied" in message and s3_bucket in message
    assert secret not in message and secret not in str(info.value.__cause__)
    assert info.value.exit_code == 4


def test_check_missing_bucket_names_it(s3_env):
    with pytest.raises(StorageError, match="no such bucket 'no-such-bucket-here'"):
        open_store("s3://no-such-bucket-here/run").check()


def test_check_unreachable_endpoint_fails_fast(s3_env):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach endpoint"):
        open_store("s3://bucket/run", endpoint_url=endpoint).check()
    assert time.monotonic() - start < 20


def test_writer_keeps_order(store, tmp_path):
    seen = []
    with BackgroundWriter(store, max_pending=4) as writer:
        for i in range(20):
            writer.submit("latest", data=str(i).encode())
            writer.submit_call(lambda i=i: seen.append((i, store.get_bytes("latest"))))
        path = tmp_path / "upload.bin"
        path.write_bytes(b"file")
        writer.submit("file.bin", path=path, delete_after=True)
        assert writer.flush(timeout=30)
    assert seen == [(i, str(i).encode()) for i in range(20)]
    assert store.get_bytes("latest") == b"19" and store.get_bytes("file.bin") == b"file"
    assert not path.exists() and writer.failures == 0


def test_writer_delete_after_spares_the_stored_file(tmp_path):
    store = LocalStore(tmp_path / "run")
    store.put_bytes("a.pt", b"a")
    with BackgroundWriter(store) as writer:
        writer.submit("a.pt", path=store.local_path("a.pt"), delete_after=True)
    assert store.get_bytes("a.pt") == b"a"


def test_writer_never_blocks_and_bounds_what_waits(tmp_path):
    store, release = LocalStore(tmp_path), threading.Event()
    writer = BackgroundWriter(store, max_pending=2)
    writer.submit_call(release.wait)  # the worker is stuck on this one, as in an outage
    start = time.monotonic()
    for i in range(3):
        writer.submit("metrics.jsonl", data=f"rows {i}".encode(), replace=True)
        writer.submit(f"samples/{i}.png", data=b"png", droppable=True)
    assert writer.has_room(1)  # snapshots and droppable items make room themselves
    writer.submit("checkpoints/1/state.pt", data=b"state")
    assert not writer.has_room(1)  # the stuck call and the checkpoint part fill it
    assert time.monotonic() - start < 1.0
    assert writer.dropped == ["samples/0.png"]
    assert writer.pending == 5  # the call, one metrics.jsonl, two grids, the part

    release.set()
    assert writer.close(timeout=10) and writer.not_stored == []
    assert store.list() == ["checkpoints/1/state.pt", "metrics.jsonl", "samples/1.png",
                            "samples/2.png"]  # fmt: skip
    assert store.get_bytes("metrics.jsonl") == b"rows 2"


def test_writer_survives_an_outage(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with SeaweedS3(tmp_path / "outage") as server:
        bucket = server.create_bucket("outage")
        store = open_store(f"s3://{bucket}/run", endpoint_url=server.endpoint_url)
        failures = []
        writer = BackgroundWriter(store, on_failure=failures.append, retry_max=1.0)
        writer.submit("before", data=b"0")
        assert writer.flush(timeout=10)

        server.stop()
        keys = [f"checkpoints/step-1/part-{i}" for i in range(3)] + ["checkpoints/step-1/COMPLETE"]
        for key in keys:
            writer.submit(key, data=key.encode())
        deadline = time.monotonic() + 10
        while writer.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.failures >= 2 and writer.pending == len(keys)

        server.start()
        assert writer.close(timeout=30)
        assert store.list() == sorted(["before", *keys])
        assert all(store.get_bytes(k) == k.encode() for k in keys)
        assert len(failures) == writer.failures
        assert "cannot reach endpoint" in str(failures[0])


def test_writer_close_gives_up_at_its_deadline_naming_what_was_not_stored(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = open_store("s3://bucket/run", endpoint_url=f"http://127.0.0.1:{closed_port()}")
    writer = BackgroundWriter(store)
    for i in range(3):
        writer.submit(f"k{i}", data=b"x")
    start = time.monotonic()
    assert not writer.close(timeout=1.0)
    assert time.monotonic() - start < 5 and writer.failures >= 1
    assert writer.not_stored == ["k0", "k1", "k2"]
    assert writer.describe_not_stored().startswith("k0, k1, k2 (last error: ")
    assert "cannot reach endpoint" in writer.describe_not_stored()


def test_download_prefix_once(s3_env, s3_bucket, tmp_path):
    client = s3_env.client()
    objects = {"train/a/1.png": b"one", "train/b/2.png": b"two!", "train/labels.txt": b"ab"}
    for key, data in objects.items():
        client.put_object(Bucket=s3_bucket, Key=f"datasets/{key}", Body=data)
    client.put_object(Bucket=s3_bucket, Key="datasets/train/empty-folder/", Body=b"")
    dest = tmp_path / "data"
    (dest / "train" / "a").mkdir(parents=True)
    (dest / "train" / "a" / "1.png").write_bytes(b"ONE")  # same size: kept as it is

    uri = f"s3://{s3_bucket}/datasets"
    threads = [threading.Thread(target=download_prefix, args=(uri, dest)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert (dest / "train" / "a" / "1.png").read_bytes() == b"ONE"
    assert (dest / "train" / "b" / "2.png").read_bytes() == b"two!"
    assert (dest / "train" / "labels.txt").read_bytes() == b"ab"
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == [".download-complete", ".download.lock", *sorted(objects)]

    # complete: a second call does not even reach the server
    assert download_prefix(uri, dest, endpoint_url=f"http://127.0.0.1:{closed_port()}") == dest


def test_download_prefix_empty_is_an_error(s3_env, s3_bucket, tmp_path):
    with pytest.raises(StorageError, match="nothing to download"):
        download_prefix(f"s3://{s3_bucket}/nothing", Path(tmp_path))
