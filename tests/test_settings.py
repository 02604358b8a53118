import base64
import io
import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from prom import PUSHGATEWAY, free_port

from job.infra.errors import SettingsError, StorageError
from job.infra.secrets import redact
from job.infra.stores import open_store
from job.settings import Settings, help_text, load_settings, settings_markdown
from tests.helpers import (
    REPO,
    job_env,
    run_job,
    write_extractor,
    write_idx,
    write_image_folder,
)
from tests.test_s3_job import bucket_objects, s3_job_env


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    return info.value.problems


def test_defaults_are_valid_and_name_the_run_after_the_config():
    s = load_settings({})
    assert s.dataset == "fashion-mnist" and s.resolved_image_size == 28
    assert s.resolved_run_id == "fashion-mnist-dcgan"
    assert load_settings({"GAN_CONDITIONAL": "true", "GAN_MODEL": "mlp"}).resolved_run_id == (
        "fashion-mnist-mlp-cond"
    )


@pytest.mark.parametrize(
    "dataset,run_id",
    [
        ("s3://bucket/data?token=SECRET", "data-dcgan"),
        ("s3://bucket/data?a=1&X-Amz-Signature=SECRET", "data-dcgan"),
        ("s3://bucket/data;sig=SECRET", "data-sig-dcgan"),
        ("s3://bucket/AKIAIOSFODNN7EXAMPLE", "data-dcgan"),
        ("folder:/images/celeba?v=2", "celeba-dcgan"),
    ],
)
def test_the_default_run_id_has_no_query_string_or_credential_of_the_dataset(dataset, run_id):
    assert load_settings({"GAN_DATASET": dataset, "GAN_IMAGE_SIZE": "32"}).resolved_run_id == run_id


def test_a_run_of_a_dataset_with_a_token_keeps_it_out_of_run_id_artifacts_and_log(tmp_path):
    root = write_image_folder(tmp_path / "imgs?token=SECRET", per_class=4)
    env = job_env(tmp_path, GAN_DATASET=f"folder:{root}", GAN_MODEL="mlp", GAN_IMAGE_SIZE=8,
                  GAN_BATCH_SIZE=4, GAN_NUM_WORKERS=0, GAN_MAX_STEPS=2)  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    written = (tmp_path / "runs").rglob("*")
    assert not [
        p for p in written if "SECRET" in str(p) or p.is_file() and b"SECRET" in p.read_bytes()
    ]
    assert "SECRET" not in result.stdout + result.stderr
    assert (tmp_path / "runs/imgs-mlp/config.json").is_file()


def test_every_bad_variable_gets_its_own_line_naming_value_and_expectation():
    lines = problems(
        {"GAN_BATCH_SIZE": "lots", "GAN_MODEL": "vae", "GAN_LR_D": "-1", "GAN_DEVICE": "tpu"}
    )
    assert len(lines) == 4
    text = "\n".join(lines)
    assert "GAN_BATCH_SIZE='lots': expected an integer" in text
    assert "GAN_MODEL='vae': expected one of 'mlp', 'dcgan' or 'r3gan'" in text
    assert "GAN_LR_D='-1': expected a number > 0" in text
    assert "GAN_DEVICE='tpu'" in text


def test_unknown_gan_variable_is_reported_as_a_typo():
    assert problems({"GAN_MAX_STEP": "10"}) == [
        "GAN_MAX_STEP: unknown setting (a typo?); see `gan-job --help` for the list"
    ]


def test_kubernetes_service_link_variables_are_not_typos():
    env = {
        "GAN_SERVICE_HOST": "10.0.0.1",
        "GAN_SERVICE_PORT": "80",
        "GAN_PORT": "tcp://10.0.0.1:80",
        "GAN_PORT_80_TCP_ADDR": "10.0.0.1",
        "GAN_WORKERS_SERVICE_PORT_HTTP": "80",
    }
    assert load_settings(env).dataset == "fashion-mnist"


def test_a_service_link_landing_on_a_real_setting_explains_itself():
    (line,) = problems({"GAN_METRICS_PORT": "tcp://10.0.0.3:9090"})
    assert "enableServiceLinks: false" in line


def test_dcgan_refuses_image_sizes_it_cannot_build():
    (line,) = problems({"GAN_IMAGE_SIZE": "48"})
    assert "GAN_IMAGE_SIZE=48" in line and "28, 32, 64" in line
    assert load_settings({"GAN_IMAGE_SIZE": "48", "GAN_MODEL": "mlp"}).resolved_image_size == 48


def test_unknown_dataset_lists_the_supported_ones():
    (line,) = problems({"GAN_DATASET": "imagenet"})
    assert "GAN_DATASET='imagenet'" in line and "folder:/path" in line


def test_invalid_settings_exit_2_before_any_work(tmp_path):
    env = job_env(tmp_path, GAN_BATCH_SIZE="0", GAN_TYPO="1")
    result = run_job(env, timeout=60)
    assert result.returncode == 2
    assert "GAN_BATCH_SIZE='0'" in result.stdout and "GAN_TYPO" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_the_job_reports_every_bad_variable_of_its_environment_at_once(tmp_path):
    """An invalid setting and a combination problem of a valid one: load_settings judges the
    combinations without the invalid setting, which must not be read back from os.environ."""
    result = run_job(job_env(tmp_path, GAN_IMAGE_SIZE=37, GAN_BATCH_SIZE=0), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "GAN_BATCH_SIZE='0': expected a number >= 1" in result.stdout
    assert "GAN_IMAGE_SIZE=37 is not supported by GAN_MODEL=dcgan: expected one of 28, 32, 64" in (
        result.stdout
    )


def test_help_lists_every_setting():
    text = help_text()
    for name in Settings.model_fields:
        assert f"GAN_{name.upper()}" in text


def test_the_documented_settings_table_matches_the_code():
    doc = (REPO / "docs" / "settings.md").read_text()
    table = re.search(r"<!-- settings:begin -->\n(.*?)\n<!-- settings:end -->", doc, re.S)
    assert table, "docs/settings.md lacks the generated settings table"
    assert table.group(1).strip() == settings_markdown().strip(), (
        "docs/settings.md's table is stale: regenerate with `python -m job.settings`"
    )


def test_combined_errors_are_reported_at_once_with_the_dependent_ones():
    lines = problems({"GAN_IMAGE_SIZE": "37", "GAN_BATCH_SIZE": "lots"})
    assert lines == [
        "GAN_BATCH_SIZE='lots': expected an integer",
        "GAN_IMAGE_SIZE=37 is not supported by GAN_MODEL=dcgan: expected one of 28, 32, 64 "
        "(GAN_MODEL=r3gan takes 16, 28, 32, 64, 128, 256)",
    ]
    # a combination that involves an invalid setting is not judged on its default
    assert problems({"GAN_IMAGE_SIZE": "37", "GAN_MODEL": "mpl"}) == [
        "GAN_MODEL='mpl': expected one of 'mlp', 'dcgan' or 'r3gan'"
    ]
    lines = problems({"GAN_CONDITIONING": "projection", "GAN_MODEL": "mlp", "GAN_DEPTH": "1"})
    assert len(lines) == 2 and "GAN_DEPTH" in lines[0] and "GAN_CONDITIONAL=true" in lines[1]


@pytest.mark.parametrize("bucket", ["bad bucket name", "Upper", "ab", "a..b", "-dash", "1.2.3.4"])
def test_s3_uris_with_invalid_bucket_names_say_what_a_bucket_name_is(bucket):
    uri = f"s3://{bucket}/prefix"
    for name in ("GAN_ARTIFACT_URI", "GAN_DATASET", "GAN_RESUME"):
        (line,) = problems({name: uri})
        assert line == (
            f"{name}={uri!r}: expected an S3 bucket name of 3-63 characters: lowercase letters, "
            f"digits, dots and hyphens, beginning and ending with a letter or digit; "
            f"{bucket!r} is not"
        )
    with pytest.raises(StorageError, match="expected an S3 bucket name of 3-63 characters"):
        open_store(uri)
    assert load_settings({"GAN_ARTIFACT_URI": "s3://my-bucket.v2/runs"}).artifact_uri


def test_metrics_port_in_use_is_a_settings_error_before_any_work(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # kmnist is not in data/: reading it first would fail with exit 3
        result = run_job(job_env(tmp_path, GAN_DATASET="kmnist", GAN_METRICS_PORT=port))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"GAN_METRICS_PORT={port}: cannot serve metrics on 0.0.0.0:{port}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# ---------------------------------------------------------------- secrets

PUSH_USER, PUSH_PASSWORD = "pushuser", "push-Secret-9f3k"
PUSH_HASH = "$2b$04$82AngtQnA/LM3lIIFGnnse5x.J8d/.9o0Vkn7LXytvScSIMld.bR2"  # bcrypt of it


def test_redact_removes_every_kind_of_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    text = (
        "push to http://user:p@ss%2Fw0rd@gw:9091/x?job=a&token=t0k&X-Amz-Signature=abc123 failed; "
        "key AKIAIOSFODNN7EXAMPLE secret wJalrXUtnFEMI/K7MDENG url https://h/o?sig=s1g;"
    )
    assert redact(text) == (
        "push to http://***@gw:9091/x?job=***&token=***&X-Amz-Signature=*** failed; "
        "key *** secret *** url https://h/o?sig=***;"
    )
    # every query value, whatever its name; a query kept in a local path named after a URL
    assert redact("shards:s3://b/p?X-Auth-Token=t1&x-api-key=k2&flag=&TOKEN3#f") == (
        "shards:s3://b/p?X-Auth-Token=***&x-api-key=***&flag=&***"
    )
    assert redact("`http://h:80/?private_token=t4` to /data/s3/b/p?api-key=k5/x y") == (
        "`http://h:80/?private_token=***` to /data/s3/b/p?api-key=*** y"
    )
    legit = "s3://bucket/runs/r1 tcp://10.0.0.1:80 fashion-mnist folder:/d/cats? ok=1"
    assert redact(legit) == legit


@contextmanager
def pushgateway_with_basic_auth(tmp: Path) -> Iterator[str]:
    (tmp / "web.yml").write_text(f"basic_auth_users:\n  {PUSH_USER}: {PUSH_HASH}\n")
    port = free_port()
    argv = [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}",
            f"--web.config.file={tmp / 'web.yml'}", f"--persistence.file={tmp / 'data'}"]  # fmt: skip
    auth = "Basic " + base64.b64encode(f"{PUSH_USER}:{PUSH_PASSWORD}".encode()).decode()
    with open(tmp / "pushgateway.log", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 20
        while True:
            try:
                request = urllib.request.Request(f"{url}/-/ready", headers={"Authorization": auth})
                urllib.request.urlopen(request, timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no Pushgateway"
                time.sleep(0.1)
        yield url, auth
    finally:
        proc.terminate()
        proc.wait(10)


def test_no_secret_reaches_logs_artifacts_checkpoints_or_metrics(s3, tmp_path):
    write_idx(tmp_path / "data", n=64)
    bucket = s3.create_bucket(f"secrets-{uuid.uuid4().hex[:8]}")
    with pushgateway_with_basic_auth(tmp_path) as (gateway, auth):
        host = gateway.removeprefix("http://")
        env = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="sec",
                         GAN_MAX_STEPS=4, GAN_CHECKPOINT_EVERY=2, GAN_SAMPLE_EVERY=2,
                         GAN_PUSHGATEWAY_URL=f"http://{PUSH_USER}:{PUSH_PASSWORD}@{host}")  # fmt: skip
        result = run_job(env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"pushed metrics to http://***@{host}" in result.stdout  # as basic auth
        request = urllib.request.Request(f"{gateway}/metrics", headers={"Authorization": auth})
        pushed = urllib.request.urlopen(request, timeout=5).read().decode()
    assert 'gan_step{instance="",job="gan-job",run_id="sec"} 4' in pushed
    objects = bucket_objects(s3, bucket, "runs/sec/")
    assert {"config.json", "checkpoints/step-00000004/state.pt", "final/generator.pt"} <= set(
        objects
    )
    config = json.loads(objects["config.json"])
    assert config["settings"]["pushgateway_url"] == f"http://***@{host}"
    state = torch.load(
        io.BytesIO(objects["checkpoints/step-00000004/state.pt"]), weights_only=False
    )
    assert state["meta"]["settings"]["pushgateway_url"] == f"http://***@{host}"

    # a settings error echoes the values it refuses: redacted too
    env["GAN_ARTIFACT_URI"] = "s3://AKIAIOSFODNN7EXAMPLE:Sh0uldNotLeak@bucket/runs"
    refused = run_job(env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "GAN_ARTIFACT_URI='s3://***@bucket/runs': expected s3://bucket/prefix without" in (
        refused.stdout
    )

    everything = result.stdout + result.stderr + refused.stdout + refused.stderr + pushed
    everything += b"".join(objects.values()).decode("latin1")
    for secret in (s3.secret_key, PUSH_PASSWORD, PUSH_USER, "AKIAIOSFODNN7EXAMPLE",
                   "Sh0uldNotLeak"):  # fmt: skip
        assert secret not in everything


# (setting, parameter) of the secrets test_no_url_setting_leaks_a_query_value_or_userinfo places
URL_SECRETS = [
    *[("pushgateway", name) for name in ("X-Auth-Token", "x-api-key", "sig", "apikey",
                                         "signature", "access_token", "token")],
    *[("dataset", name) for name in ("api-key", "private_token", "X-Amz-Signature",
                                     "X-Amz-Credential", "X-Amz-Security-Token")],
    *[("artifacts", name) for name in ("password", "passwd", "secret", "client_secret")],
    *[("resume", name) for name in ("key", "auth", "session")],
]  # fmt: skip


def test_no_url_setting_leaks_a_query_value_or_userinfo(s3, tmp_path):
    """20 common forms of a credential in the URL-valued settings, each with its own value, none
    of them on the list of names redact() once knew but sig, token...: none reaches the log,
    config.json, a checkpoint, metrics.jsonl, eval.jsonl, the pushed metrics or a model card,
    while the URLs still work (the push authenticates, the data, artifacts and resume are read
    where they point)."""
    tag = uuid.uuid4().hex[:6]
    value = {(where, name): f"Leak{i:02d}{tag}" for i, (where, name) in enumerate(URL_SECRETS)}

    def query(where: str) -> str:
        return "&".join(f"{n}={v}" for (w, n), v in value.items() if w == where)

    bucket = s3.create_bucket(f"urls-{uuid.uuid4().hex[:8]}")
    for path in write_idx(tmp_path / "idx", n=64).iterdir():
        s3.client().upload_file(str(path), bucket, f"data/{path.name}")
    runs = f"s3://{bucket}/runs?{query('artifacts')}"
    with pushgateway_with_basic_auth(tmp_path) as (gateway, auth):
        host = gateway.removeprefix("http://")
        env = s3_job_env(tmp_path, s3, GAN_DATASET=f"s3://{bucket}/data?{query('dataset')}",
                         GAN_ARTIFACT_URI=runs, GAN_RUN_ID="first", GAN_MAX_STEPS=4,
                         GAN_CHECKPOINT_EVERY=2, GAN_SAMPLE_EVERY=2, GAN_FID_EVERY=0,
                         GAN_FID_FEATURES=write_extractor(tmp_path / "features.pt"),
                         GAN_FID_NUM_SAMPLES=32,
                         GAN_PUSHGATEWAY_URL=f"http://{PUSH_USER}:{PUSH_PASSWORD}@{host}/"
                         f"?{query('pushgateway')}")  # fmt: skip
        first = run_job(env)
        assert first.returncode == 0, first.stdout + first.stderr
        pushed_to = f"pushed metrics to http://***@{host}/?X-Auth-Token=***&x-api-key=***"
        assert pushed_to in first.stdout
        resumed = run_job({**env, "GAN_RUN_ID": "second", "GAN_MAX_STEPS": "6",
                           "GAN_RESUME": f"s3://{bucket}/runs/first?{query('resume')}"})  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        request = urllib.request.Request(f"{gateway}/metrics", headers={"Authorization": auth})
        pushed = urllib.request.urlopen(request, timeout=5).read().decode()
    assert 'gan_step{instance="",job="gan-job",run_id="second"} 6' in pushed
    second = runs.replace("/runs?", "/runs/second?")
    exported = run_job(env, "export", second, "--out", str(tmp_path / "g.pt"))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    card = json.loads((tmp_path / "g.pt.card.json").read_text())
    assert card["dataset"] == f"s3://{bucket}/data?api-key=***&private_token=***" + (
        "&X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Security-Token=***"
    )
    objects = bucket_objects(s3, bucket, "runs/")
    assert {"first/eval.jsonl", "second/checkpoints/step-00000006/state.pt"} <= set(objects)
    config = json.loads(objects["second/config.json"])
    assert config["settings"]["resume"] == f"s3://{bucket}/runs/first?key=***&auth=***&session=***"

    # refused: botocore takes no query in an endpoint; the rendezvous is host:port
    endpoint = f"{s3.endpoint_url}/?sig=Leak20{tag}&X-Auth-Token=Leak21{tag}"
    bad_endpoint = run_job({**env, "GAN_S3_ENDPOINT_URL": endpoint})
    assert bad_endpoint.returncode != 0, bad_endpoint.stdout + bad_endpoint.stderr
    rdzv = f"http://u:Leak22{tag}@h:29400/?session=Leak23{tag}"
    bad_rdzv = run_job({**env, "GAN_NNODES": "2", "GAN_RDZV_ENDPOINT": rdzv})
    assert bad_rdzv.returncode == 2, bad_rdzv.stdout + bad_rdzv.stderr
    assert "GAN_RDZV_ENDPOINT='http://***@h:29400/?session=***'" in bad_rdzv.stdout

    outputs = [first, resumed, exported, bad_endpoint, bad_rdzv]
    everything = "".join(r.stdout + r.stderr for r in outputs) + pushed
    everything += "".join((tmp_path / f"g.pt.card.{ext}").read_text() for ext in ("json", "md"))
    everything += b"".join(objects.values()).decode("latin1")
    refused = [f"Leak{i}{tag}" for i in (20, 21, 22, 23)]
    for secret in [*value.values(), PUSH_USER, PUSH_PASSWORD, *refused]:
        assert secret not in everything, secret


def test_settings_table_rows_have_four_cells_and_name_optional_types():
    rows = settings_markdown().splitlines()
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) == 4, row
        assert cells[3].strip(), f"no description: {row}"
    (image_size,) = [r for r in rows if r.startswith("| `GAN_IMAGE_SIZE`")]
    assert "| int, optional |" in image_size and "pixels per side" in image_size
    (model,) = [r for r in rows if r.startswith("| `GAN_MODEL`")]
    assert "| one of mlp, dcgan, r3gan |" in model


def test_nproc_per_node_auto_is_one_process_per_visible_gpu_and_one_on_cpu():
    gpus = torch.cuda.device_count()
    assert load_settings({"GAN_NPROC_PER_NODE": "auto"}).nproc_per_node == max(gpus, 1)
    assert load_settings({"GAN_NPROC_PER_NODE": "auto", "GAN_DEVICE": "cpu"}).nproc_per_node == 1
    assert load_settings({"GAN_NPROC_PER_NODE": "3"}).nproc_per_node == 3
    (line,) = problems({"GAN_NPROC_PER_NODE": "all"})
    assert line.startswith("GAN_NPROC_PER_NODE='all': expected an integer or auto")


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("GAN_UPLOAD_TIMEOUT_MINUTES", "inf", "a finite number"),
        ("GAN_MAX_MINUTES", "nan", "a finite number"),
        ("GAN_RUN_LEASE_SECONDS", "inf", "a finite number"),
        ("GAN_SHARD_CACHE_MB", "inf", "a finite number"),
        ("GAN_UPLOAD_TIMEOUT_MINUTES", "1e12", "a number <= 525600"),
        ("GAN_MAX_MINUTES", "1e300", "a number <= 525600"),
        ("GAN_RUN_LEASE_SECONDS", "1e12", "a number <= 86400"),
        ("GAN_SEED", "100000000000000", "a number <= 4294967295"),
        ("GAN_MAX_STEPS", str(10**19), "a number <= 1000000000000"),
        ("GAN_CHECKPOINT_EVERY", str(10**19), "a number <= 1000000000000"),
        ("GAN_FID_NUM_SAMPLES", str(10**9), "a number <= 10000000"),
    ],
)
def test_infinite_nan_and_huge_numbers_are_refused_naming_the_bound(variable, value, expected):
    """Each of these once reached a thread's wait (OverflowError) or torch's manual_seed
    (ValueError) as a traceback."""
    (line,) = problems({variable: value})
    assert line.startswith(f"{variable}={value!r}: expected {expected}"), line


def test_the_largest_seed_and_time_budgets_allowed_still_work():
    s = load_settings({"GAN_SEED": "4294967295", "GAN_UPLOAD_TIMEOUT_MINUTES": "525600"})
    torch.manual_seed(s.seed * 1_000_003 + s.max_steps * 1009 + 64)  # job/run/rng.py's largest
    assert threading.Event().wait(min(s.upload_timeout_minutes * 60, 0.01)) is False


def test_an_infinite_upload_timeout_exits_2_not_with_a_traceback(tmp_path):
    result = run_job(job_env(tmp_path, GAN_UPLOAD_TIMEOUT_MINUTES="inf", GAN_SEED=10**14))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "GAN_UPLOAD_TIMEOUT_MINUTES='inf': expected a finite number" in result.stdout
    assert "GAN_SEED='100000000000000': expected a number <= 4294967295" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "endpoint, what",
    [
        ("http://minio:s3cr3tPw0rd@127.0.0.1:8333", "it has a user:password@"),
        ("http://127.0.0.1:8333/?token=s3cr3tPw0rd", "it has a ?query or #fragment"),
    ],
)
def test_an_s3_endpoint_with_credentials_or_a_query_exits_2_without_echoing_them(
    tmp_path, endpoint, what
):
    """botocore takes either: a user:password@ failed at the first request, in an error quoting
    the password; a query as "Invalid region"."""
    result = run_job(job_env(tmp_path, GAN_S3_ENDPOINT_URL=endpoint))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "GAN_S3_ENDPOINT_URL=" in result.stdout and what in result.stdout
    assert "expected an http:// or https:// URL of a host and an optional port" in result.stdout
    assert "S3 keys go in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.stdout
    assert "s3cr3tPw0rd" not in output and "Traceback" not in output
    assert load_settings({"GAN_S3_ENDPOINT_URL": "http://[::1]:8333"}).s3_endpoint_url
