"""Rules of the code base that a reader relies on, checked on the source itself."""

import ast
import re

from conftest import ROOT
from faults import ENV as FAULT_ENV

SOURCES = sorted([*(ROOT / "harness").rglob("*.py"), *(ROOT / "launch").glob("*.py")])


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_test_hook_in_production_code():
    for path in SOURCES:
        text = path.read_text()
        assert FAULT_ENV not in text and not re.search(r"\bfault", text), path


def test_only_the_launcher_layer_exits_the_process():
    for path in SOURCES:
        if path.name != "cli.py":
            assert "sys.exit(" not in path.read_text(), path


def test_no_import_cycle_between_harness_modules():
    modules = {module_name(p): p for p in SOURCES if p.parts[-2] != "launch"}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions too: no cycle dodged
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & modules.keys()
        graph[name] = deps & modules.keys() - {name}

    def visit(name, path):
        assert name not in path, " -> ".join([*path, name])
        for dep in graph[name]:
            visit(dep, [*path, name])

    for name in graph:
        visit(name, [])


def test_every_import_inside_a_function_says_why():
    for path in SOURCES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s+(from \S+ )?import ", line) and not path.name.endswith("__init__.py"):
                assert "#" in line or lines[i - 1].strip().startswith("#"), f"{path}:{i + 1}: {line.strip()}"
