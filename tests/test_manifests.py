"""Kubernetes manifests, compose file and env example: schema-valid, renderable, and consistent
with the job's settings, the image, and each other. No cluster needed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from job.settings import PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# podFailurePolicy is GA from 1.31: the oldest version these manifests are meant for
KUBE_VERSION = "1.31.0"
# Custom resources: kubernetes-validate has no schema for them and only warns
CRD_KINDS = {"PodMonitor", "PrometheusRule", "PyTorchJob"}
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
JOB_FILES = ["job.yaml", "job-multinode.yaml"]
# exit codes a retry cannot fix (job/errors.py); 4 (storage) and 75 (SIGTERM) must be retried
PERMANENT_EXIT_CODES = {2, 3, 5, 6, 7}
GAN_VAR = re.compile(r"\bGAN_[A-Z0-9_]+\b")
SETTING_NAMES = {PREFIX + name.upper() for name in Settings.model_fields}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def docs_of_kind(kind: str) -> list[dict]:
    return [d for p in MANIFESTS for d in load_docs(p) if d["kind"] == kind]


def pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the manifests create."""
    out = [(f"Job {j['metadata']['name']}", j["spec"]["template"]) for j in docs_of_kind("Job")]
    for pj in docs_of_kind("PyTorchJob"):
        for role, spec in pj["spec"]["pytorchReplicaSpecs"].items():
            out.append((f"PyTorchJob {pj['metadata']['name']} {role}", spec["template"]))
    return out


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def check_validate_output(result: subprocess.CompletedProcess) -> None:
    """Fail on errors; accept 'no schema' warnings for the known custom resources only."""
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for line in out.splitlines():
        if line.startswith("WARN"):
            kind = re.search(r"schema for kind (\w+)", line)
            assert kind and kind.group(1) in CRD_KINDS, line
        else:
            assert not line.startswith(("ERROR", "FATAL")), line


def kubernetes_validate_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    cmd += ["--kubernetes-version", KUBE_VERSION, *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def rendered() -> str:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed (CI installs kubernetes-client)")
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_expected_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"job.yaml", "job-multinode.yaml", "pytorchjob.yaml", "configmap.yaml"} <= names
    assert {"secret.example.yaml", "podmonitor.yaml", "prometheusrule.yaml"} <= names


def test_every_manifest_passes_strict_schema_validation():
    check_validate_output(kubernetes_validate_cli(*map(str, MANIFESTS)))


def test_pytorchjob_pod_templates_pass_strict_schema_validation():
    # the PyTorchJob itself has no schema here; its pods are plain pod templates
    for where, template in pod_templates():
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        doc["template"] = template
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            pytest.fail(f"{where}: {path}: {e.message}")


def test_kustomize_renders_job_settings_secret_and_monitoring(rendered):
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "ConfigMap", "Secret", "Job", "PodMonitor", "PrometheusRule"]
    )
    dashboards = [d for d in docs if d["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert len(dashboards) == 1
    dashboard = dashboards[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["name"] == "gan-job-dashboard"  # no hash suffix
    (content,) = dashboard["data"].values()
    assert isinstance(json.loads(content), dict)
    check_validate_output(kubernetes_validate_cli("-", stdin=rendered))


def test_every_gan_variable_is_a_real_setting():
    files = [*K8S.rglob("*.yaml"), ROOT / "docker-compose.yml", ROOT / "local.env.example"]
    files.append(ROOT / "Dockerfile")
    seen = set()
    for path in files:
        for name in GAN_VAR.findall(path.read_text()):
            assert name in SETTING_NAMES, f"{path.relative_to(ROOT)}: {name} is not a setting"
            seen.add(name)
    assert {"GAN_ARTIFACT_URI", "GAN_NPROC_PER_NODE", "GAN_METRICS_PORT"} <= seen


def test_configmap_and_job_env_are_valid_settings():
    (configmap,) = [
        d for d in docs_of_kind("ConfigMap") if d["metadata"]["name"] == "gan-job-settings"
    ]
    settings = dict(configmap["data"])
    assert all(key.startswith(PREFIX) for key in settings)
    (job,) = [j for j in docs_of_kind("Job") if j["metadata"]["name"] == "gan-job"]
    settings |= env_of(job["spec"]["template"]["spec"]["containers"][0])
    loaded = load_settings(settings)
    assert loaded.artifact_uri.startswith("s3://")


def test_local_env_example_is_valid_settings():
    env = {}
    for line in (ROOT / "local.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    load_settings({k: v for k, v in env.items() if k.startswith(PREFIX)})


@pytest.mark.parametrize("name", JOB_FILES)
def test_job_fails_fast_on_permanent_errors_and_ignores_disruptions(name):
    (job,) = [d for d in load_docs(K8S / name) if d["kind"] == "Job"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert 1 <= spec["backoffLimit"] <= 10
    rules = spec["podFailurePolicy"]["rules"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert any(c["type"] == "DisruptionTarget" for r in ignore for c in r["onPodConditions"])
    (fail,) = [r for r in rules if r["action"] == "FailJob"]
    codes = fail["onExitCodes"]
    assert codes["operator"] == "In"
    assert set(codes["values"]) == PERMANENT_EXIT_CODES
    assert codes["containerName"] in {c["name"] for c in pod["containers"]}


def dockerfile_value(instruction: str, key: str | None = None) -> str:
    """The last value of a Dockerfile instruction (of ENV key), i.e. the final stage's."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    values = re.findall(rf"^{instruction}\s+(.+)$", text, flags=re.M)
    if key:
        values = [m for v in values for m in re.findall(rf"\b{key}=(\S+)", v)]
    return values[-1].strip()


@pytest.mark.parametrize(
    "where,template", pod_templates(), ids=[where for where, _ in pod_templates()]
)
def test_pods_are_locked_down_with_writable_scratch(where, template):
    pod = template["spec"]
    (container,) = pod["containers"]
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    uid = int(dockerfile_value("USER").split(":")[0])
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid, where
    assert sc["allowPrivilegeEscalation"] is False, where
    assert sc["capabilities"]["drop"] == ["ALL"], where
    assert sc["readOnlyRootFilesystem"] is True, where
    assert pod["enableServiceLinks"] is False, where
    assert pod["terminationGracePeriodSeconds"] >= 60, where  # room for a final checkpoint
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "gan-job"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where
    # with a read-only root: HOME, /tmp and the working dir (data cache, local runs) writable
    for path in ("/tmp", dockerfile_value("ENV", "HOME"), dockerfile_value("WORKDIR")):
        assert "emptyDir" in mounts[path], f"{where}: {path}"

    assert gpus(container) >= 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(env_of(container)["GAN_METRICS_PORT"]) == 9090


def test_single_node_job_runs_one_process_per_gpu():
    (job,) = load_docs(K8S / "job.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert int(env_of(container)["GAN_NPROC_PER_NODE"]) == gpus(container)
    assert "command" not in container  # the image's entrypoint: gan-job starts torchrun
    for ref in container["envFrom"]:  # so that job.yaml alone applies and runs
        (source,) = ref.values()
        assert source["optional"] is True


def test_multinode_job_rendezvous_matches_its_service():
    docs = {d["kind"]: d for d in load_docs(K8S / "job-multinode.yaml")}
    job, service = docs["Job"], docs["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = " ".join(container["args"]).replace("\\\n", " ")
    args = dict(a.split("=", 1) for a in shlex.split(script) if a.startswith("--") and "=" in a)
    job_name, svc_name = job["metadata"]["name"], service["metadata"]["name"]

    assert spec["completionMode"] == "Indexed"
    assert int(args["--nnodes"]) == spec["completions"] == spec["parallelism"]
    assert int(args["--nproc-per-node"]) == gpus(container)
    assert args["--rdzv-backend"] == "c10d"
    assert args["--rdzv-endpoint"] == f"{job_name}-0.{svc_name}:29500"
    assert "JOB_COMPLETION_INDEX" in script and script.rstrip().endswith("-m job")
    assert pod["subdomain"] == svc_name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job_name}
    assert "GAN_NPROC_PER_NODE" not in env_of(container)  # torchrun is told directly


def test_pytorchjob_runs_torchrun_with_the_operators_topology():
    (pj,) = docs_of_kind("PyTorchJob")
    for spec in pj["spec"]["pytorchReplicaSpecs"].values():
        (container,) = spec["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["command"] == ["torchrun", "-m", "job"]
        assert int(pj["spec"]["nprocPerNode"]) == gpus(container)


def test_all_pods_use_one_image():
    images = {c["image"] for _, t in pod_templates() for c in t["spec"]["containers"]}
    assert len(images) == 1, images


def test_compose_file_wires_job_storage_and_monitoring():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"minio", "prometheus", "grafana", "job"} <= set(services)
    job_env = services["job"]["environment"]
    load_settings({k: v for k, v in job_env.items() if k.startswith(PREFIX)})

    scrape = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"job:{job_env['GAN_METRICS_PORT']}"]

    dashboard_mounts = [v.split(":")[0] for v in services["grafana"]["volumes"]]
    assert dashboard_mounts == ["./k8s/grafana/dashboard.json"]
    assert (ROOT / dashboard_mounts[0]).is_file()
