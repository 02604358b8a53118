"""Shared fixtures, and the `e2e` and `contract` markers. S3 tests run against a real SeaweedFS
server (tests/s3server.py)."""

from __future__ import annotations

import inspect
import re
import types
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from s3server import SeaweedS3, use_server

TESTS = Path(__file__).resolve().parent
# modules whose tests are all end-to-end, whatever they call
# (test_netns starts the job from methods of its network class, which the reading below does
# not follow)
E2E_MODULES = {"test_launcher", "test_multinode", "test_faults", "test_netns"}
# `make test` runs every test that is not e2e and, of the e2e ones, these: one end-to-end test per
# contract of the job. `make test-all` runs everything.
CONTRACTS = {
    # the artifacts of a run
    "test_train.py::test_default_dataset_run_writes_every_artifact",
    # bit-exact resume
    "test_train.py::test_resumed_run_matches_an_uninterrupted_one_bit_for_bit",
    # SIGTERM: a checkpoint, exit 75, and the resumed run is bit-identical
    "test_reliability.py::test_sigterm_checkpoints_and_the_resumed_run_is_bit_identical[1]",
    # two ranks under torchrun
    "test_distributed.py::test_two_ranks_keep_identical_weights_and_fid_matches_one_process",
    # S3: every artifact in a real S3 server
    "test_s3_job.py::test_run_stores_every_artifact_in_s3_like_the_local_store",
    # the subcommands
    "test_sample.py::test_sample_from_checkpoint_export_and_run_folder_agree",
    "test_export.py::test_export_loads_without_gan_job_and_draws_what_sample_draws_for_the_same_z[dcgan]",
    "test_evaluate_run.py::test_gan_job_evaluate_prints_a_table_and_a_json_line_and_leaves_the_run_alone",
    "test_compare.py::test_compare_tables_and_plots_a_local_and_an_s3_run",
    "test_dryrun.py::test_dry_run_over_checkpoints_says_it_would_resume_and_changes_no_file[env]",
    "test_sweep.py::test_each_row_of_a_sweep_is_its_own_run",
    "test_features.py::test_unparseable_arguments_exit_2",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark e2e every test that starts the job, torchrun or the bench in a new Python process:
    each takes seconds, together they are most of the suite's time; `make test-fast` leaves
    them out."""
    for item in items:
        if not isinstance(item, pytest.Function) or item.get_closest_marker("e2e"):
            continue
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        module = item.module.__name__.rpartition(".")[2]
        if module in E2E_MODULES or starts_the_job([item.function, *fixtures]):
            item.add_marker(pytest.mark.e2e)
        if f"{module}.py::{item.name}" in CONTRACTS:
            item.add_marker(pytest.mark.contract)


def starts_the_job(functions: list[Callable]) -> bool:
    """Whether these functions (a test and its fixtures), or a function of tests/ they call
    (helpers.run_job, say), run sys.executable with the job or torch: read off their code."""
    todo = list(functions)
    seen: set[types.CodeType] = set()
    while todo:
        func = inspect.unwrap(todo.pop())  # a @contextmanager helper: the function it wraps
        code = getattr(func, "__code__", None)
        if code is None or code in seen or not code.co_filename.startswith(str(TESTS)):
            continue
        seen.add(code)
        names, strings = _names_and_strings(code)
        if {"sys", "executable"} <= names and any(map(_JOB_ARGUMENT.search, strings)):
            return True
        todo += [func.__globals__[n] for n in names if n in func.__globals__]
    return False


# `-m job`, `-m torch.distributed.run`, `-m benchmarks.bench` or a script.py, as an argv item
# or inside a shell line
_JOB_ARGUMENT = re.compile(r"^(job|torch|benchmarks)(\.|$)|-m (job|torch|benchmarks)\b|\.py$")


def _names_and_strings(code: types.CodeType) -> tuple[set[str], list[str]]:
    """The global and attribute names and the string constants of code, nested code included."""
    names, strings = set(code.co_names), [c for c in code.co_consts if isinstance(c, str)]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner_names, inner_strings = _names_and_strings(const)
            names |= inner_names
            strings += inner_strings
    return names, strings


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> SeaweedS3:
    """One SeaweedFS S3 server for the whole session: endpoint_url, access_key, secret_key, env()."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3) -> str:
    """A fresh, empty bucket on the session's server."""
    return s3.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path) -> SeaweedS3:
    """The process environment pointed at the server, as a pod would see it (no ~/.aws files)."""
    use_server(monkeypatch, s3, tmp_path)
    return s3
