"""The house rule of docs/architecture.md, read from every import of job/ with `ast`:
tools -> run -> {settings, quality, data, gan} -> infra; only the composition root
(job/run/build.py), the tools and `__main__` read Settings; no tool imports another tool; no
import circle. Imports inside functions count: they close circles at run time all the same."""

from __future__ import annotations

import ast
from pathlib import Path

JOB = Path(__file__).resolve().parent.parent / "job"

# a wing may import the wings of a lower tier, and its own tier's other wings (no circle)
TIER = {"__main__": 4, "tools": 3, "run": 2, "settings": 1, "quality": 1, "data": 1, "gan": 1}
TIER["infra"] = 0
READS_SETTINGS = {"job.run.build", "job.__main__"}  # and every tool
MAX_LINES = 500  # settings.py, the schema, is the one exception


def module_name(path: Path) -> str:
    parts = path.relative_to(JOB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    return module.split(".")[1]


def job_imports(path: Path) -> set[str]:
    """The job modules that `path` imports (`from job.run import build` names job.run.build)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("job."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "job" or node.module.startswith("job."):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(
                        sub
                        if (JOB.parent / (sub.replace(".", "/") + ".py")).exists()
                        else node.module
                    )
    return {m for m in found if m not in ("job",) and not m.endswith(".__init__")}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in JOB.rglob("*.py")}
    return {m: {i for i in job_imports(p) if i in modules and i != m} for m, p in modules.items()}


def rule_breaks(graph: dict[str, set[str]]) -> list[str]:
    breaks = []
    for module, imported in graph.items():
        for target in sorted(imported):
            here, there = wing(module), wing(target)
            if target == "job.settings" and not (
                module in READS_SETTINGS or here == "tools" or here == "settings"
            ):
                breaks.append(f"{module} -> {target}: only build, the tools and __main__ read it")
            elif here == there == "tools":
                breaks.append(f"{module} -> {target}: a tool imports another tool")
            elif here != there and TIER[here] < TIER[there]:
                breaks.append(f"{module} -> {target}: {here} may not import {there}")
    return breaks


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, once each (Tarjan's strongly connected components of two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            part = []
            while True:
                n = stack.pop()
                part.append(n)
                if n == m:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def test_every_import_keeps_the_house_rule():
    assert rule_breaks(import_graph()) == []


def test_no_import_closes_a_circle():
    assert circles(import_graph()) == []


def test_every_module_belongs_to_a_wing():
    for path in JOB.rglob("*.py"):
        assert wing(module_name(path)) in TIER if path.parent != JOB else True, path
    assert sorted(p.name for p in JOB.glob("*.py")) == ["__init__.py", "__main__.py", "settings.py"]


def test_no_module_is_longer_than_500_lines_but_the_settings_schema():
    long = {
        str(p.relative_to(JOB.parent)): n
        for p in JOB.rglob("*.py")
        if p.name != "settings.py" and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_rule_check_sees_a_break_and_a_circle():
    graph = {
        "job.infra.store": {"job.run.build"},
        "job.run.build": {"job.infra.store"},
        "job.tools.a": {"job.tools.b"},
        "job.tools.b": set(),
        "job.data.datasets": {"job.settings"},
        "job.settings": set(),
    }
    assert rule_breaks(graph) == [
        "job.infra.store -> job.run.build: infra may not import run",
        "job.tools.a -> job.tools.b: a tool imports another tool",
        "job.data.datasets -> job.settings: only build, the tools and __main__ read it",
    ]
    assert circles(graph) == [["job.infra.store", "job.run.build"]]
