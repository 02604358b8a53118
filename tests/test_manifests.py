"""Kubernetes manifests, compose file and env example: schema-valid (custom resources against
their CRDs' schemas in k8s/schemas, unknown fields forbidden), renderable with kustomize, and
consistent with the job's settings, exit statuses, the image, and each other. No cluster needed."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from job.infra import launcher
from job.settings import PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# podFailurePolicy is GA from 1.31: the oldest version these manifests are meant for
KUBE_VERSION = "1.31.0"
# sweep.yaml is applied on its own and checked by tests/test_sweep.py
MANIFESTS = sorted(
    p for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", "sweep.yaml")
)
WORKLOADS = ["job.yaml", "jobset.yaml", "trainjob.yaml", "pytorchjob.yaml"]
# job/infra/errors.py: exit statuses a retry cannot fix, and those that ask for one
PERMANENT_EXIT_CODES = {2, 3, 5, 6, 7, 9, 11}
RETRY_EXIT_CODES = {4, 8, 10, 75}
SIGKILL_EXIT_CODE = 137
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
GAN_VAR = re.compile(r"\bGAN_[A-Z0-9_]+\b")
SETTING_NAMES = {PREFIX + name.upper() for name in Settings.model_fields}
OPERATIONS = ROOT / "docs" / "operations.md"


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def docs_of_kind(kind: str) -> list[dict]:
    return [d for p in MANIFESTS for d in load_docs(p) if d["kind"] == kind]


def crd_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for path in (K8S / "schemas").glob("*.json"):
        schema = json.loads(path.read_text())
        props = schema["properties"]
        out[(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    return out


CRD_SCHEMAS = crd_schemas()


def job_specs() -> list[tuple[str, dict]]:
    """(where, batch/v1 JobSpec) for every Job the manifests make, directly or through a JobSet."""
    out = [(f"Job {j['metadata']['name']}", j["spec"]) for j in docs_of_kind("Job")]
    for kind, spec_of in (("JobSet", lambda d: d["spec"]), ("TrainingRuntime", jobset_of)):
        for doc in docs_of_kind(kind):
            for rjob in spec_of(doc)["replicatedJobs"]:
                out.append(
                    (f"{kind} {doc['metadata']['name']} {rjob['name']}", rjob["template"]["spec"])
                )
    return out


def jobset_of(runtime: dict) -> dict:
    return runtime["spec"]["template"]["spec"]


def pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the manifests create."""
    out = [(where, spec["template"]) for where, spec in job_specs()]
    for pj in docs_of_kind("PyTorchJob"):
        for role, spec in pj["spec"]["pytorchReplicaSpecs"].items():
            out.append((f"PyTorchJob {pj['metadata']['name']} {role}", spec["template"]))
    return out


def env_of(container: dict, index: int = 0) -> dict[str, str]:
    """A container's env as a pod with completion index `index` gets it."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX, var
            env[var["name"]] = str(index)
    return env


def gpus(resources: dict) -> int:
    return int(resources["limits"]["nvidia.com/gpu"])


def check_validate_output(result: subprocess.CompletedProcess) -> None:
    """Fail on errors; accept 'no schema' warnings only for the kinds k8s/schemas covers."""
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    known = {kind for _, kind in CRD_SCHEMAS}
    for line in out.splitlines():
        if line.startswith("WARN"):
            kind = re.search(r"schema for kind (\w+)", line)
            assert kind and kind.group(1) in known, line
        else:
            assert not line.startswith(("ERROR", "FATAL")), line


def kubernetes_validate_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    cmd += ["--kubernetes-version", KUBE_VERSION, *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)


def crd_errors(doc: dict) -> list[str]:
    schema = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]


def custom_resources() -> list[dict]:
    return [
        d for p in MANIFESTS for d in load_docs(p) if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS
    ]


def kustomize(root: Path) -> subprocess.CompletedProcess:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed (CI installs kubernetes-client)")
    return subprocess.run(
        ["kubectl", "kustomize", str(root)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def k8s_copy(tmp_path) -> Path:
    """k8s/ with an s3.env made from the example, as a user prepares it."""
    copy_ = tmp_path / "k8s"
    shutil.copytree(K8S, copy_, ignore=shutil.ignore_patterns("s3.env"))
    shutil.copy(copy_ / "s3.env.example", copy_ / "s3.env")
    return copy_


def use_workload(root: Path, workload: str) -> None:
    path = root / "kustomization.yaml"
    text = path.read_text()
    assert text.count("\n  - job.yaml\n") == 1
    path.write_text(text.replace("\n  - job.yaml\n", f"\n  - {workload}\n"))


# --- schemas ---------------------------------------------------------------------------------


def test_the_expected_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {*WORKLOADS, "configmap.yaml", "podmonitor.yaml", "prometheusrule.yaml"} <= names
    assert not docs_of_kind("Secret"), "no Secret in git: kustomize makes it from s3.env"


def test_builtin_kinds_pass_strict_schema_validation():
    check_validate_output(kubernetes_validate_cli(*map(str, MANIFESTS)))


@pytest.mark.parametrize(
    "doc", custom_resources(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}"
)
def test_custom_resources_pass_their_crd_schema(doc):
    assert crd_errors(doc) == []


def test_crd_schemas_forbid_unknown_fields_at_any_depth():
    (jobset,) = docs_of_kind("JobSet")
    assert crd_errors(jobset) == []
    for path in (["spec"], ["spec", "failurePolicy"], ["spec", "replicatedJobs", 0, "template",
                 "spec", "template", "spec", "containers", 0]):  # fmt: skip
        bad = copy.deepcopy(jobset)
        node = bad
        for key in path:
            node = node[key]
        node["tolerationz"] = []
        assert any("tolerationz" in e for e in crd_errors(bad)), path
    bad = copy.deepcopy(jobset)
    bad["metadata"]["label"] = {"a": "b"}
    assert crd_errors(bad)


def test_pod_and_job_templates_pass_strict_schema_validation():
    """The workloads' embedded Job and pod templates, against the built-in schemas of 1.31."""
    docs = [
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "t"}, "spec": spec}
        for _, spec in job_specs()
    ]
    docs += [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t}
        for _, t in pod_templates()
    ]
    for doc, (where, _) in zip(docs, job_specs() + pod_templates(), strict=True):
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")


# --- kustomize -------------------------------------------------------------------------------


def test_kustomize_renders_settings_secret_workload_and_monitoring(k8s_copy):
    result = kustomize(k8s_copy)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "ConfigMap", "Secret", "Job", "PodMonitor", "PrometheusRule"]
    )
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "gan-job-s3"  # the name the workloads refer to
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    dashboards = [d for d in docs if d["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert len(dashboards) == 1
    dashboard = dashboards[0]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["name"] == "gan-job-dashboard"  # no hash suffix
    (content,) = dashboard["data"].values()
    assert isinstance(json.loads(content), dict)
    check_validate_output(kubernetes_validate_cli("-", stdin=result.stdout))
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            assert crd_errors(doc) == [], doc["kind"]


def test_kustomize_without_s3_env_fails_rather_than_apply_a_placeholder_secret(k8s_copy):
    (k8s_copy / "s3.env").unlink()
    result = kustomize(k8s_copy)
    assert result.returncode != 0 and "s3.env" in result.stderr
    ignored = subprocess.run(["git", "check-ignore", "-q", "k8s/s3.env"], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, "k8s/s3.env must be git-ignored"


@pytest.mark.parametrize("workload", WORKLOADS)
def test_kustomize_images_sets_the_image_of_every_workload(k8s_copy, workload):
    use_workload(k8s_copy, workload)
    path = k8s_copy / "kustomization.yaml"
    config = yaml.safe_load(path.read_text())
    (image,) = config["images"]
    image.update(newName="registry.test/ml/gan-job", newTag="9.9.9")
    path.write_text(yaml.safe_dump(config))
    result = kustomize(k8s_copy)
    assert result.returncode == 0, result.stderr
    images = re.findall(r"^\s*-?\s*image: (\S+)$", result.stdout, flags=re.M)
    assert images and set(images) == {"registry.test/ml/gan-job:9.9.9"}
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            assert crd_errors(doc) == [], doc["kind"]


def test_all_pods_use_one_image_that_kustomize_names():
    images = {c["image"] for _, t in pod_templates() for c in t["spec"]["containers"]}
    assert len(images) == 1, images
    (image,) = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert images == {f"{image['name']}:{image['newTag']}"}


# --- settings ----------------------------------------------------------------------------------


def test_every_gan_variable_is_a_real_setting():
    files = [*K8S.rglob("*.yaml"), ROOT / "docker-compose.yml", ROOT / "local.env.example"]
    files += [ROOT / "Dockerfile", K8S / "s3.env.example"]
    seen = set()
    for path in files:
        for name in GAN_VAR.findall(path.read_text()):
            assert name in SETTING_NAMES, f"{path.relative_to(ROOT)}: {name} is not a setting"
            seen.add(name)
    assert {"GAN_ARTIFACT_URI", "GAN_NPROC_PER_NODE", "GAN_METRICS_PORT", "GAN_NNODES"} <= seen


def configmap_settings() -> dict[str, str]:
    (configmap,) = [
        d for d in docs_of_kind("ConfigMap") if d["metadata"]["name"] == "gan-job-settings"
    ]
    assert all(key.startswith(PREFIX) for key in configmap["data"])
    return dict(configmap["data"])


def node_pods() -> list[tuple[str, int, dict[str, str], dict, int]]:
    """(workload, node index, env, resources, node count) for every node of every workload."""
    out = []
    (job,) = docs_of_kind("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    out.append(("Job", 0, env_of(container), container["resources"], 1))
    (jobset,) = docs_of_kind("JobSet")
    (rjob,) = jobset["spec"]["replicatedJobs"]
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    n = rjob["template"]["spec"]["completions"]
    assert rjob["replicas"] == 1 and rjob["template"]["spec"]["parallelism"] == n
    out += [("JobSet", i, env_of(container, i), container["resources"], n) for i in range(n)]
    (tj,) = docs_of_kind("TrainJob")
    (runtime,) = docs_of_kind("TrainingRuntime")
    assert tj["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    (rjob,) = jobset_of(runtime)["replicatedJobs"]
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    trainer, n = tj["spec"]["trainer"], tj["spec"]["trainer"]["numNodes"]
    for i in range(n):  # Trainer adds the TrainJob's env to the runtime's container
        env = env_of(container, i) | env_of({"env": trainer["env"]})
        out.append(("TrainJob", i, env, trainer["resourcesPerNode"], n))
    (pj,) = docs_of_kind("PyTorchJob")
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    n = sum(r["replicas"] for r in replicas.values())
    for role, spec in replicas.items():
        (container,) = spec["template"]["spec"]["containers"]
        out.append((f"PyTorchJob {role}", 0 if role == "Master" else 1, env_of(container),
                    container["resources"], n))  # fmt: skip
    return out


@pytest.mark.parametrize("where,index,env,resources,nodes", node_pods(),
                         ids=[f"{p[0]}-{p[1]}" for p in node_pods()])  # fmt: skip
def test_every_pod_gets_valid_settings_that_match_its_resources(where, index, env, resources,
                                                                nodes):  # fmt: skip
    settings = load_settings(configmap_settings() | env)
    assert settings.artifact_uri.startswith("s3://")  # pods share nothing else
    assert settings.device == "cuda"  # a GPU pod without a usable GPU stops at once (exit 9)
    assert settings.nproc_per_node == gpus(resources)
    assert settings.nnodes == nodes
    assert settings.metrics_port == 9090


def test_multinode_pods_meet_at_pod_0_which_alone_hosts_the_store():
    """The endpoint is pod 0's DNS name in each kind's naming scheme, and torchrun is told that
    pod 0 (and only pod 0) hosts the store, rather than guessing it from DNS that may lag."""
    (jobset,) = docs_of_kind("JobSet")
    (tj,) = docs_of_kind("TrainJob")
    (pj,) = docs_of_kind("PyTorchJob")
    pod0 = {
        "JobSet": f"{jobset['metadata']['name']}-node-0-0.{jobset['metadata']['name']}",
        "TrainJob": f"{tj['metadata']['name']}-node-0-0.{tj['metadata']['name']}",
        "PyTorchJob": f"{pj['metadata']['name']}-master-0",
    }
    for where, index, env, _, nodes in node_pods():
        if nodes == 1:
            assert "GAN_RDZV_ENDPOINT" not in env
            continue
        kind = where.split()[0]
        settings = load_settings(configmap_settings() | env)
        assert settings.rdzv_endpoint.rsplit(":", 1)[0] == pod0[kind], where
        assert settings.rdzv_timeout_seconds >= 600, where  # image pulls take minutes
        options = launcher.torchrun_options(
            settings.nproc_per_node, settings.nnodes, settings.node_rank,
            settings.rdzv_endpoint, settings.rdzv_timeout_seconds,
        )  # fmt: skip
        (conf,) = [a.removeprefix("--rdzv-conf=") for a in options if a.startswith("--rdzv-conf=")]
        conf = dict(kv.split("=") for kv in conf.split(","))
        assert conf["is_host"] == ("true" if index == 0 else "false"), where
        assert conf["read_timeout"] == conf["join_timeout"] == str(settings.rdzv_timeout_seconds)


def test_jobset_pod_0_sorts_first_so_it_holds_rank_0_and_the_metrics():
    """torchrun's c10d rendezvous ranks nodes by their sorted host names: pod 0 must come first
    for the PodMonitor, which scrapes completion index 0, to find global rank 0."""
    for name in ("gan-job-mn", "gan-job-tj"):
        for n in (2, 9, 10, 11, 100, 1000):
            hosts = [f"{name}-node-0-{i}.{name}.ns.svc.cluster.local" for i in range(n)]
            assert sorted(hosts)[0] == hosts[0]


def test_workloads_run_the_images_entrypoint_gan_job():
    """gan-job (not a bare torchrun) starts torchrun, so the pod's exit status is the job's."""
    for where, template in pod_templates():
        (container,) = template["spec"]["containers"]
        assert "command" not in container and "args" not in container, where
    (tj,) = docs_of_kind("TrainJob")
    assert "command" not in tj["spec"]["trainer"] and "args" not in tj["spec"]["trainer"]


# --- failure handling ----------------------------------------------------------------------------


def pod_failure(spec: dict, code: int, disrupted: bool = False) -> tuple[str, str]:
    """What the Job controller does with a failed pod: (action, Job failure message), following
    its podFailurePolicy rules in order (pkg/controller/job/pod_failure_policy.go)."""
    container = spec["template"]["spec"]["containers"][0]["name"]
    for index, rule in enumerate(spec["podFailurePolicy"]["rules"]):
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            if req["containerName"] == container and (code in req["values"]) == (
                req["operator"] == "In"
            ):
                msg = f"Container {container} for pod ns/p failed with exit code {code} "
                return rule["action"], msg + f"matching {rule['action']} rule at index {index}"
        elif disrupted and any(c["type"] == "DisruptionTarget" for c in rule["onPodConditions"]):
            msg = f"Pod ns/p has condition DisruptionTarget matching {rule['action']} rule at index {index}"
            return rule["action"], msg
    return "Count", ""


def jobset_action(jobset_spec: dict, job_spec: dict, code: int, disrupted: bool = False) -> str:
    """What JobSet does when one pod of its Job fails that way (its failurePolicy rules)."""
    action, message = pod_failure(job_spec, code, disrupted)
    if action == "FailJob":
        reason = "PodFailurePolicy"
    elif action == "Count" and job_spec["backoffLimit"] == 0:
        reason = "BackoffLimitExceeded"
    else:
        return "no Job failure"
    for rule in jobset_spec["failurePolicy"]["rules"]:
        if reason in rule.get("onJobFailureReasons", [reason]) and all(
            re.search(p, message) for p in rule.get("onJobFailureMessagePatterns", [])
        ):
            return rule["action"]
    return "RestartJobSet"


def test_single_node_job_fails_fast_retries_and_ignores_disruptions_but_not_kills():
    (job,) = docs_of_kind("Job")
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["podReplacementPolicy"] == "Failed"  # no new pod while the old one checkpoints
    assert 1 <= spec["backoffLimit"] <= 10
    for code in PERMANENT_EXIT_CODES:
        assert pod_failure(spec, code)[0] == "FailJob", code
        assert pod_failure(spec, code, disrupted=True)[0] == "FailJob", code
    for code in RETRY_EXIT_CODES | {1, 143}:
        assert pod_failure(spec, code)[0] == "Count", code
        assert pod_failure(spec, code, disrupted=True)[0] == "Ignore", code
    # killed without grace (a kubelet eviction the job may cause itself): ends at backoffLimit
    assert pod_failure(spec, SIGKILL_EXIT_CODE, disrupted=True)[0] == "Count"


@pytest.mark.parametrize("kind", ["JobSet", "TrainingRuntime"])
def test_jobset_fails_fast_and_restarts_the_whole_group_counting_all_but_disruptions(kind):
    (doc,) = docs_of_kind(kind)
    jobset = doc["spec"] if kind == "JobSet" else jobset_of(doc)
    (rjob,) = jobset["replicatedJobs"]
    spec = rjob["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["backoffLimit"] == 0  # any failed pod fails the Job: the JobSet acts on it
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert 1 <= jobset["failurePolicy"]["maxRestarts"] <= 20
    for code in PERMANENT_EXIT_CODES:
        assert jobset_action(jobset, spec, code) == "FailJobSet", code
    for code in RETRY_EXIT_CODES | {1, 143}:
        assert jobset_action(jobset, spec, code) == "RestartJobSet", code
        assert jobset_action(jobset, spec, code, True) == "RestartJobSetAndIgnoreMaxRestarts"
    assert jobset_action(jobset, spec, SIGKILL_EXIT_CODE, True) == "RestartJobSet"
    (deadline,) = [r for r in jobset["failurePolicy"]["rules"] if "DeadlineExceeded" in
                   r.get("onJobFailureReasons", [])]  # fmt: skip
    assert deadline["action"] == "FailJobSet"


def test_every_workload_is_bounded_in_time_and_cleaned_up():
    (job,) = docs_of_kind("Job")
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    (jobset,) = docs_of_kind("JobSet")
    assert jobset["spec"]["ttlSecondsAfterFinished"] > 0
    for where, spec in job_specs():
        assert spec["activeDeadlineSeconds"] > 0, where
    (pj,) = docs_of_kind("PyTorchJob")
    run = pj["spec"]["runPolicy"]
    assert run["activeDeadlineSeconds"] > 0 and run["ttlSecondsAfterFinished"] > 0
    assert 1 <= run["backoffLimit"] <= 10


def test_gpu_workloads_ask_kueue_for_gang_admission():
    for doc in [*docs_of_kind("Job"), *docs_of_kind("JobSet"), *docs_of_kind("TrainJob"),
                *docs_of_kind("PyTorchJob")]:  # fmt: skip
        assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], doc["kind"]


# --- pods ----------------------------------------------------------------------------------------


def dockerfile_value(instruction: str, key: str | None = None) -> str:
    """The last value of a Dockerfile instruction (of ENV key), i.e. the final stage's."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    values = re.findall(rf"^{instruction}\s+(.+)$", text, flags=re.M)
    if key:
        values = [m for v in values for m in re.findall(rf"\b{key}=(\S+)", v)]
    return values[-1].strip()


def quantity(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", value).groups()
    return int(number) * units.get(unit, 1)


@pytest.mark.parametrize(
    "where,template", pod_templates(), ids=[where for where, _ in pod_templates()]
)
def test_pods_are_locked_down_bounded_and_have_writable_scratch(where, template):
    pod = template["spec"]
    (container,) = pod["containers"]
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    uid = int(dockerfile_value("USER").split(":")[0])
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid, where
    assert sc["allowPrivilegeEscalation"] is False, where
    assert sc["capabilities"]["drop"] == ["ALL"], where
    assert sc["readOnlyRootFilesystem"] is True, where
    assert pod["enableServiceLinks"] is False, where
    assert pod["automountServiceAccountToken"] is False, where
    assert pod["terminationGracePeriodSeconds"] >= 60, where  # room for a final checkpoint
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ], where
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "gan-job"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where
    # with a read-only root: HOME, /tmp and the working dir (data cache, local runs) writable
    for path in ("/tmp", dockerfile_value("ENV", "HOME"), dockerfile_value("WORKDIR")):
        assert "emptyDir" in mounts[path], f"{where}: {path}"
    # the disk emptyDirs fit in the ephemeral storage the pod asks for
    disk = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in volumes.values()
               if v["emptyDir"].get("medium") != "Memory")  # fmt: skip
    resources = container.get("resources")
    if resources is None:  # TrainingRuntime: the TrainJob sizes the node
        (tj,) = docs_of_kind("TrainJob")
        resources = tj["spec"]["trainer"]["resourcesPerNode"]
    assert quantity(resources["requests"]["ephemeral-storage"]) >= disk, where
    assert resources["requests"]["memory"] == resources["limits"]["memory"], where
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == 9090


def test_compose_file_wires_job_storage_and_monitoring_on_localhost_only():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"minio", "prometheus", "grafana", "job"} <= set(services)
    job_env = services["job"]["environment"]
    load_settings({k: v for k, v in job_env.items() if k.startswith(PREFIX)})
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"

    scrape = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"job:{job_env['GAN_METRICS_PORT']}"]

    dashboard_mounts = [v.split(":")[0] for v in services["grafana"]["volumes"]]
    assert dashboard_mounts == ["./k8s/grafana/dashboard.json"]
    assert (ROOT / dashboard_mounts[0]).is_file()


def test_make_run_local_publishes_metrics_on_localhost_only():
    recipe = (ROOT / "Makefile").read_text().split("\nrun-local:")[1].split("\n\n")[0]
    ports = re.findall(r"\s-p ([0-9.:]+)", recipe)  # docker run -p, not mkdir -p
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports


# --- monitoring ----------------------------------------------------------------------------------


def relabel_keeps(endpoint: dict, labels: dict[str, str]) -> bool:
    """Prometheus' keep action over the pod's labels (anchored regex, ';'-joined sources)."""
    for rule in endpoint.get("relabelings", []):
        assert rule["action"] == "keep"
        names = [s.removeprefix("__meta_kubernetes_pod_label_") for s in rule["sourceLabels"]]
        value = rule.get("separator", ";").join(
            next((v for k, v in labels.items() if re.sub(r"[^a-zA-Z0-9_]", "_", k) == n), "")
            for n in names
        )
        if not re.fullmatch(rule["regex"], value):
            return False
    return True


def scraped_pods() -> dict[str, bool]:
    """Every pod the workloads run (the labels Kubernetes and the operators add included),
    and whether the PodMonitor scrapes it."""
    (monitor,) = docs_of_kind("PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    pods = {}
    for where, template in pod_templates():
        labels = dict(template["metadata"]["labels"])
        indexed = where.split()[0] in ("JobSet", "TrainingRuntime")
        for index in range(3) if indexed else [None]:
            pod_labels = labels | (
                {"batch.kubernetes.io/job-completion-index": str(index)} if indexed else {}
            )
            selected = selector.items() <= pod_labels.items()
            name = where if index is None else f"{where} index {index}"
            pods[name] = selected and relabel_keeps(endpoint, pod_labels)
            (container,) = template["spec"]["containers"]
            assert endpoint["port"] in {p["name"] for p in container["ports"]}
    return pods


def test_podmonitor_scrapes_exactly_the_pods_holding_rank_0():
    scraped = scraped_pods()
    assert scraped == {
        "Job gan-job": True,
        "JobSet gan-job-mn node index 0": True,
        "JobSet gan-job-mn node index 1": False,
        "JobSet gan-job-mn node index 2": False,
        "TrainingRuntime gan-job node index 0": True,
        "TrainingRuntime gan-job node index 1": False,
        "TrainingRuntime gan-job node index 2": False,
        "PyTorchJob gan-job-pt Master": True,
        "PyTorchJob gan-job-pt Worker": False,
    }


def operations_anchors() -> set[str]:
    """GitHub's anchors of the headings of docs/operations.md."""
    headings = re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_alerts_wait_have_a_severity_and_a_runbook_section():
    (rule,) = docs_of_kind("PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    anchors = operations_anchors()
    for alert in alerts:
        assert re.fullmatch(r"\d+[smh]", alert["for"]), alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        url = alert["annotations"]["runbook_url"]
        page, anchor = url.split("#")
        assert page.endswith("/docs/operations.md"), url
        assert anchor == alert["alert"].lower() and anchor in anchors, url


def test_operations_doc_covers_every_exit_status_and_workload_kind():
    text = OPERATIONS.read_text()
    from job.infra import errors

    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    table = set(map(int, re.findall(r"^\| (\d+) \|", text, flags=re.M)))
    assert codes <= table, codes - table
    for kind in ("Job", "JobSet", "TrainJob", "PyTorchJob"):
        assert f"### {kind}" in text
