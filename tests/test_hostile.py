"""Hostile inputs that once ended in a hang or a traceback (issue 31), each with real processes:
nodes of one run started with different settings, an artifact folder that turns read-only
mid-run, and wall-clock jumps."""

from __future__ import annotations

import subprocess
import sys
import time

from s3server import free_ports

from job.infra.distributed import value_holders
from job.run.agree import _comparable, _disagreement
from tests.helpers import REPO, job_env, run_job, write_idx


def test_values_held_by_some_ranks_only_are_listed_with_their_holders():
    held = [(1, {"a": "2", "b": "x"}), (0, {"a": "1", "b": "x"}), (0, {"a": "1", "b": "x"})]
    assert list(value_holders(held)["a"].items()) == [("1", [0]), ("2", [1])]
    assert value_holders([(0, {"a": "1"}), (1, {})]) == {"a": {"1": [0], "<unset>": [1]}}
    line = _disagreement("GAN_A", {"1": [0, 2], "2": [1]})
    assert line == "GAN_A differs between the nodes: 1 on nodes 0, 2, 2 on node 1"


def test_a_value_holding_a_secret_is_compared_by_digest_and_never_shown():
    one, two = (_comparable(f"http://user:hunter{n}@gw:9091") for n in (1, 2))
    assert one != two and "hunter" not in one + two
    assert "hunter" not in _comparable("http://gw:9091/?X-Auth-Token=hunter3")  # any query value
    line = _disagreement("GAN_PUSHGATEWAY_URL", {one: [0], two: [1]})
    assert "hunter" not in line and "holds a secret" in line and "node 0; node 1" in line


def test_nodes_started_with_different_settings_both_exit_2_naming_them(tmp_path):
    """Once node 0 trained on for 400 s and node 1 exited 10 after 108 s."""
    port = free_ports(1)[0]
    per_node = [
        dict(GAN_MAX_STEPS=40, GAN_CHECKPOINT_EVERY=20, GAN_WIDTH=8),
        dict(GAN_MAX_STEPS=400, GAN_CHECKPOINT_EVERY=50, GAN_WIDTH=16),
    ]
    jobs = []
    for rank, different in enumerate(per_node):
        folder = tmp_path / f"node{rank}"  # its own GAN_DATA_DIR and GAN_METRICS_PORT
        write_idx(folder / "data", n=256)
        env = job_env(folder, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_RUN_ID="mn",
                      GAN_ARTIFACT_URI=tmp_path / "runs", GAN_NNODES=2, GAN_NODE_RANK=rank,
                      GAN_NPROC_PER_NODE=1, GAN_RDZV_ENDPOINT=f"127.0.0.1:{port}",
                      GAN_METRICS_PORT=free_ports(1)[0],
                      GAN_PUSHGATEWAY_URL=f"http://user:hunter{rank}2@127.0.0.1:9/",
                      **different)  # fmt: skip
        jobs.append(subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=REPO,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    t0 = time.monotonic()
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [2, 2], outputs
    assert time.monotonic() - t0 < 180, outputs  # start-up alone takes 30 s on a busy CPU
    for output in outputs:
        assert "GAN_MAX_STEPS differs between the nodes: 40 on node 0, 400 on node 1" in output
        assert (
            "GAN_CHECKPOINT_EVERY differs between the nodes: 20 on node 0, 50 on node 1" in output
        )
        assert "GAN_WIDTH differs between the nodes: 8 on node 0, 16 on node 1" in output
        assert (
            "GAN_PUSHGATEWAY_URL differs between the nodes (node 0; node 1): it holds a secret"
            in output
        )
        assert "hunter" not in output and "unexpected failure" not in output
        for per_node_setting in (
            "GAN_NODE_RANK differs",
            "GAN_DATA_DIR differs",
            "GAN_METRICS_PORT differs",
        ):
            assert per_node_setting not in output
        assert "step 1/" not in output  # refused before any step
    assert not (tmp_path / "runs" / "mn" / "lock.json").exists()


# the checkpoints a run left complete, each read back and verified, in the namespace that holds
# its tmpfs
VERIFY = """
import sys
from job.run import checkpoint
from job.infra.local_store import LocalStore
store = LocalStore(sys.argv[1])
steps = checkpoint.complete_steps(store)
for step in steps:
    checkpoint.load_verified(store, step)
print("verified", *steps)
"""


def test_an_artifact_folder_turning_read_only_mid_run_exits_4_naming_it(tmp_path):
    """Once an OSError traceback (exit 1) from appending metrics.jsonl; the checkpoints stored
    before stay complete, and the job does not wait GAN_UPLOAD_TIMEOUT_MINUTES for writes that
    cannot succeed."""
    write_idx(tmp_path / "data", n=256)
    disk = tmp_path / "disk"
    disk.mkdir()
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=100000, GAN_CHECKPOINT_EVERY=10,
                  GAN_SAMPLE_EVERY=100000, GAN_ARTIFACT_URI=disk, GAN_RUN_ID="ro")  # fmt: skip
    run = disk / "ro"
    script = f"""
        mount -t tmpfs -o size=16m tmpfs "{disk}" || exit 99
        "{sys.executable}" -m job & job=$!
        i=0
        until ls "{run}"/checkpoints/*/COMPLETE.json >/dev/null 2>&1; do
            i=$((i + 1)); [ $i -lt 1200 ] || {{ kill $job; exit 98; }}; sleep 0.1
        done
        until mount -o remount,ro "{disk}"; do sleep 0.05; done  # busy while a file is written
        echo "remounted read-only at $(date +%s.%N)"
        wait $job; code=$?
        echo "exited at $(date +%s.%N)"
        "{sys.executable}" -c '{VERIFY}' "{run}"
        exit $code
    """
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert errors and f"{run}: cannot write " in errors[-1], output
    assert "Read-only file system (the folder refuses writes)" in errors[-1]
    remounted, exited = (float(line.split()[-1]) for line in result.stdout.splitlines()
                         if line.startswith(("remounted read-only at", "exited at")))  # fmt: skip
    assert exited - remounted < 60, output  # not GAN_UPLOAD_TIMEOUT_MINUTES (30)
    (verified,) = [
        line.split()[1:] for line in result.stdout.splitlines() if line.startswith("verified")
    ]
    assert verified and "10" in verified, output


def test_an_s3_dataset_with_an_unwritable_data_dir_exits_4_naming_it(tmp_path):
    """Its copy goes to GAN_DATA_DIR: once a FileNotFoundError traceback from mkdir (exit 1).
    /proc takes no new folders; the check comes before any request to the (absent) store."""
    env = job_env(tmp_path, GAN_DATASET="s3://some-bucket/data", GAN_DATA_DIR="/proc/gan-data",
                  GAN_DEVICE="cpu", GAN_S3_ENDPOINT_URL="http://127.0.0.1:9")  # fmt: skip
    env.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    result = run_job(env, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert (
        "/proc/gan-data/s3/some-bucket/data: cannot write the copy of s3://some-bucket/data"
        in result.stdout
    )
    assert "set GAN_DATA_DIR to a writable folder" in result.stdout
