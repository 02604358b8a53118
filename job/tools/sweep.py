"""`gan-job sweep FILE`: many runs from one file of settings, each row a real job.

A sweep file is YAML (JSON is YAML too) or JSON lines. In YAML it is either a list of rows or a
mapping with `rows:`, an optional `name:` (default: the file's stem) and an optional `common:`
mapping that every row starts from. A row is a mapping of GAN_* variables plus an optional
`name` (default: <sweep name>-<index>, so that run ids, which label the metrics, stay unique
across sweeps). JSON lines hold one row per line.

Row i runs with the caller's environment, then `common`, then the row's variables, and:
GAN_ARTIFACT_URI=<base>/<sweep name>, where base is what that merged environment says (default
./runs), and GAN_RUN_ID=<row name>. So a sweep's runs lie side by side under one prefix, which
`gan-job compare` expands to its runs.

Every row is validated before any runs: one bad row fails the sweep (exit 2) naming the row.
Locally the rows run as `python -m job` subprocesses, one after another or --parallel N at a
time; `--index I` runs row I alone in this process's place (exec), which is what each pod of
the Indexed Job in k8s/sweep.yaml does with its completion index.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from job.infra.errors import EXIT_OK, EXIT_PREEMPTED, SettingsError
from job.settings import PREFIX, Settings, load_settings

log = logging.getLogger(__name__)

NAME = re.compile(Settings.model_fields["run_id"].metadata[0].pattern)
SET_BY_SWEEP = (PREFIX + "RUN_ID",)


@dataclass
class Row:
    index: int
    name: str
    env: dict[str, str]  # the row's GAN_* variables after common, base URI and run id
    status: int | None = None
    seconds: float = 0.0
    artifacts: str = field(default="")


@dataclass
class Sweep:
    name: str
    rows: list[Row]


def load_sweep(path: str | Path, environ: Mapping[str, str] | None = None) -> Sweep:
    """Parse and validate every row against the settings; SettingsError lists all problems,
    each naming its row."""
    environ = dict(os.environ if environ is None else environ)
    path = Path(path)
    name, common, raw_rows = _parse(path)
    problems: list[str] = []
    if not NAME.match(name):
        problems.append(f"{path}: sweep name {name!r}: expected a value matching {NAME.pattern}")
    problems += _check_variables(f"{path}: common", common)
    if not raw_rows:
        problems.append(f"{path}: no rows")
    rows, seen = [], set()
    for index, raw in enumerate(raw_rows):
        where = f"{path}: row {index}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a mapping of GAN_* variables, got {raw!r}")
            continue
        row_name = str(raw.get("name", f"{name}-{index}"))
        where += f" ({row_name})" if "name" in raw else ""
        variables = {k: v for k, v in raw.items() if k != "name"}
        row_problems = _check_variables(where, variables)
        if not NAME.match(row_name):
            row_problems.append(
                f"{where}: name {row_name!r}: expected a value matching {NAME.pattern}"
            )
        elif row_name in seen:
            row_problems.append(f"{where}: name {row_name!r} is used by an earlier row")
        seen.add(row_name)
        env = _row_env(environ, common, variables, name, row_name)
        if not row_problems:
            try:
                load_settings({**environ, **env})
            except SettingsError as exc:
                row_problems += [f"{where}: {p}" for p in exc.problems]
        problems += row_problems
        rows.append(
            Row(index, row_name, env, artifacts=f"{env[PREFIX + 'ARTIFACT_URI']}/{row_name}")
        )
    if problems:
        raise SettingsError(problems)
    return Sweep(name, rows)


def _parse(path: Path) -> tuple[str, dict, list]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError([f"sweep file {path}: {exc.strerror or exc}"]) from exc
    try:
        if path.suffix == ".jsonl":
            doc: object = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        raise SettingsError([f"sweep file {path}: not valid YAML or JSON lines: {exc}"]) from exc
    if isinstance(doc, list):
        return path.stem, {}, doc
    if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
        unknown = sorted(set(doc) - {"name", "common", "rows"})
        if unknown:
            raise SettingsError(
                [f"sweep file {path}: unknown keys {unknown}: expected name, common, rows"]
            )
        common = doc.get("common") or {}
        if not isinstance(common, dict):
            raise SettingsError(
                [f"sweep file {path}: common: expected a mapping of GAN_* variables"]
            )
        return str(doc.get("name", path.stem)), common, doc["rows"]
    raise SettingsError([f"sweep file {path}: expected a list of rows or a mapping with rows:"])


def _check_variables(where: str, variables: dict) -> list[str]:
    problems = []
    for key, value in variables.items():
        if not str(key).startswith(PREFIX):
            problems.append(f"{where}: {key!r}: expected GAN_* variables (and name)")
        elif key in SET_BY_SWEEP:
            problems.append(f"{where}: {key} is set by the sweep: the row's name is its run id")
        elif isinstance(value, (dict, list)):
            problems.append(f"{where}: {key}: expected a single value, got {value!r}")
    return problems


def _row_env(environ: dict, common: dict, variables: dict, sweep: str, row: str) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k.startswith(PREFIX)}
    env |= {str(k): _text(v) for k, v in {**common, **variables}.items()}
    base = env.get(PREFIX + "ARTIFACT_URI") or Settings.model_fields["artifact_uri"].default
    env[PREFIX + "ARTIFACT_URI"] = f"{base.rstrip('/')}/{sweep}"
    env[PREFIX + "RUN_ID"] = row
    return env


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _child_env(row: Row) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}, **row.env}


def exec_row(row: Row) -> None:
    """Become row's job: signals and the exit status are then the job's own (a pod's PID 1)."""
    log.info("sweep row %d (%s): run %s", row.index, row.name, row.artifacts)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "job"], _child_env(row))


class _Runner:
    """Runs rows as child processes; a SIGTERM/SIGINT stops launching rows and is passed on to
    the running ones (which checkpoint and exit 75)."""

    def __init__(self) -> None:
        self.children: dict[int, subprocess.Popen] = {}
        self.stopped: int | None = None
        self.lock = threading.Lock()

    def handle(self, signum, frame) -> None:
        self.stopped = signum
        with self.lock:
            for child in self.children.values():
                child.send_signal(signum)

    def run(self, row: Row, prefix: bool) -> Row:
        if self.stopped is not None:
            return row
        start = time.monotonic()
        with self.lock:
            child = subprocess.Popen(
                [sys.executable, "-m", "job"],
                env=_child_env(row),
                start_new_session=True,
                stdout=subprocess.PIPE if prefix else None,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.children[row.index] = child
        if prefix:
            for line in child.stdout:
                sys.stdout.write(f"[{row.name}] {line}")
        row.status = child.wait()
        row.seconds = time.monotonic() - start
        with self.lock:
            del self.children[row.index]
        log.info("sweep row %d (%s) exited %d", row.index, row.name, row.status)
        return row


def run_sweep(sweep: Sweep, parallel: int = 1) -> int:
    """Every row, at most `parallel` at a time; 0 if all rows exit 0, else the first failing
    row's status (75 for rows never started because the sweep was stopped)."""
    runner = _Runner()
    previous = {sig: signal.signal(sig, runner.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(lambda r: runner.run(r, prefix=parallel > 1), sweep.rows))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary(sweep), flush=True)
    for row in sweep.rows:
        if row.status is None:
            return EXIT_PREEMPTED
        if row.status != EXIT_OK:
            return row.status
    return EXIT_OK


def summary(sweep: Sweep) -> str:
    lines = [
        f"sweep {sweep.name}: {len(sweep.rows)} rows",
        "  row  name                 exit   time  artifacts",
    ]
    for r in sweep.rows:
        status = "-" if r.status is None else str(r.status)
        lines.append(
            f"  {r.index:>3}  {r.name:<20} {status:>4} {_minutes(r.seconds):>6}  {r.artifacts}"
        )
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gan-job sweep", description="Run every row of a sweep file as its own run."
    )
    parser.add_argument("file", help="YAML (or JSON lines) sweep file")
    parser.add_argument("--parallel", type=int, default=1, help="rows run at once (default 1)")
    parser.add_argument(
        "--index",
        type=int,
        default=None,
        help="run this row only, in place of this process (an Indexed Job's completion index)",
    )
    args = parser.parse_args(argv)
    if args.parallel < 1:
        raise SettingsError([f"--parallel {args.parallel}: expected an integer >= 1"])
    sweep = load_sweep(args.file)
    if args.index is None:
        log.info(
            "sweep %s: %d rows valid, %d at a time", sweep.name, len(sweep.rows), args.parallel
        )
        return run_sweep(sweep, args.parallel)
    if not 0 <= args.index < len(sweep.rows):
        raise SettingsError(
            [f"--index {args.index}: {args.file} has rows 0..{len(sweep.rows) - 1}"]
        )
    exec_row(sweep.rows[args.index])
    return EXIT_OK  # not reached
