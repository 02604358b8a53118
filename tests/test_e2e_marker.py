"""`make test-fast` leaves out the tests that start the job: conftest.py finds them by reading
their code (a test, its fixtures, the functions of tests/ they call), so a new test is marked
without anyone remembering to."""

import subprocess
import sys
from collections.abc import Callable

from conftest import starts_the_job

from tests import helpers


def defined(source: str) -> Callable:
    """The function `t` defined by source, as if written in a module of tests/."""
    namespace = {**vars(helpers), "subprocess": subprocess, "sys": sys}
    exec(compile(source, helpers.__file__, "exec"), namespace)
    return namespace["t"]


def test_running_the_job_through_a_helper_is_e2e():
    assert starts_the_job([defined("def t(tmp):\n    run_job(job_env(tmp))")])
    via_a_function = (
        "def train(tmp):\n    return run_job(job_env(tmp))\ndef t(tmp):\n    train(tmp)"
    )
    assert starts_the_job([defined(via_a_function)])


def test_starting_the_job_torchrun_or_the_bench_directly_is_e2e():
    for source in (
        "def t():\n    subprocess.Popen([sys.executable, '-m', 'job'])",
        "def t():\n    subprocess.run([sys.executable, '-m', 'torch.distributed.run', 'w.py'])",
        "def t():\n    subprocess.run(['sh', '-c', f'{sys.executable} -m job.bench'])",
        "def t():\n    subprocess.run([sys.executable, 'benchmarks/bench.py', '--steps', '2'])",
    ):
        assert starts_the_job([defined(source)]), source


def test_a_fixture_that_runs_the_job_makes_its_tests_e2e():
    test = defined("def t(trained):\n    assert trained")
    fixture = defined("def t(tmp_path):\n    return run_job(job_env(tmp_path))")
    assert not starts_the_job([test])
    assert starts_the_job([test, fixture])


def test_other_subprocesses_and_plain_calls_are_not_e2e():
    for source in (
        "def t():\n    subprocess.run([sys.executable, '-m', 'kubernetes_validate'])",
        "def t():\n    subprocess.run(['promtool', 'check', 'rules', 'job.yaml'])",
        "def t(tmp):\n    write_idx(tmp)\n    return job_env(tmp)",
    ):
        assert not starts_the_job([defined(source)]), source


def test_every_contract_of_make_test_names_a_test_that_exists():
    from conftest import CONTRACTS, TESTS

    for node in CONTRACTS:
        module, name = node.split("::")
        source = (TESTS / module).read_text()
        assert f"def {name.split('[')[0]}(" in source, f"conftest.CONTRACTS: {node} is gone"


def test_a_context_manager_that_runs_the_job_makes_its_tests_e2e():
    source = (
        "import contextlib\n"
        "@contextlib.contextmanager\n"
        "def running():\n    yield subprocess.Popen([sys.executable, '-m', 'job'])\n"
        "def t():\n    with running():\n        pass"
    )
    assert starts_the_job([defined(source)])
