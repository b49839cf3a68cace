"""The floors of etlsvc (ARCHITECTURE.md, "Floors"): no module imports a floor above its own,
no two modules import each other in a circle, and no import hides from these checks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "etlsvc"


def floors() -> dict[str, int]:
    """{module or package: floor} as ARCHITECTURE.md writes it (lines ``N  a, b/, c``)."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    section = text.split("## Floors", 1)[1].split("```", 2)[1]
    found: dict[str, int] = {}
    for line in section.splitlines():
        if m := re.match(r"^\s*(\d+)\s+(.+?)\s*(?:#.*)?$", line):
            for name in m.group(2).split(","):
                found[name.strip().rstrip("/")] = int(m.group(1))
    return found


def modules() -> dict[str, Path]:
    """{dotted name below etlsvc: path} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "__init__"] = path
    return out


def floor_of(module: str, order: dict[str, int]) -> int:
    head = module.split(".")[0]
    if head not in order:
        raise AssertionError(f"etlsvc.{module} is on no floor of ARCHITECTURE.md")
    return order[head]


class Imports(ast.NodeVisitor):
    """The etlsvc modules a file imports, with where and how."""

    def __init__(self, module: str, lines: list[str], known: set[str]) -> None:
        self.module = module
        self.known = known
        self.lines = lines
        self.found: list[tuple[str, int, bool]] = []    # (target, line, inside a function)
        self.type_checking: list[int] = []
        self._depth = 0

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            self.type_checking.append(node.lineno)
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.startswith("etlsvc."):
                self._add(alias.name.removeprefix("etlsvc."), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            raise AssertionError(f"etlsvc.{self.module}:{node.lineno}: relative import")
        if base == "etlsvc":
            for alias in node.names:
                if alias.name != "__version__":
                    self._add(alias.name, node.lineno)
        elif base.startswith("etlsvc."):
            target = base.removeprefix("etlsvc.")
            for alias in node.names:
                # `from etlsvc.load import write` imports the module etlsvc.load.write.
                sub = f"{target}.{alias.name}"
                self._add(sub if sub in self.known else target, node.lineno)

    def _add(self, target: str, line: int) -> None:
        self.found.append((target, line, self._depth > 0))


def scan() -> dict[str, Imports]:
    out = {}
    found = modules()
    for module, path in found.items():
        source = path.read_text()
        imports = Imports(module, source.splitlines(), set(found))
        imports.visit(ast.parse(source))
        out[module] = imports
    return out


def test_architecture_names_every_package_and_top_module() -> None:
    order = floors()
    for module in modules():
        floor_of(module, order)
    assert set(order) <= {m.split(".")[0] for m in modules()}, (
        "ARCHITECTURE.md names a floor member that does not exist")


def test_no_import_goes_up_a_floor() -> None:
    order = floors()
    wrong = [f"etlsvc.{m}:{line} imports etlsvc.{target} (floor {floor_of(target, order)} "
             f"above its own {floor_of(m, order)})"
             for m, imports in scan().items() for target, line, _ in imports.found
             if floor_of(target, order) > floor_of(m, order)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle() -> None:
    graph = {m: {t for t, _, _ in i.found if t != m} for m, i in scan().items()}
    # A package imports its __init__: `etlsvc.extract.csv_files` runs `etlsvc/extract/__init__`.
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" → ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_hidden_imports() -> None:
    """No TYPE_CHECKING block, and an import inside a function only under a comment that
    says why."""
    wrong = []
    for m, imports in scan().items():
        wrong += [f"etlsvc.{m}:{line}: TYPE_CHECKING" for line in imports.type_checking]
        for target, line, inside in imports.found:
            above = imports.lines[line - 2].strip() if line > 1 else ""
            if inside and not above.startswith("#"):
                wrong.append(f"etlsvc.{m}:{line}: imports etlsvc.{target} inside a function "
                             "without a comment above saying why")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("bad, message", [
    ("from etlsvc.api import data\n", "imports etlsvc.api.data (floor"),
    ("if TYPE_CHECKING:\n    from etlsvc.db import Database\n", "TYPE_CHECKING"),
    ("def f():\n    from etlsvc import db\n", "inside a function"),
])
def test_the_checks_catch_what_they_look_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             bad: str, message: str) -> None:
    """Each check fails on a module that breaks its rule (so a green run means something)."""
    fake = tmp_path / "src" / "etlsvc"
    for path in PACKAGE.rglob("*.py"):
        target = fake / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (fake / "contract.py").write_text((PACKAGE / "contract.py").read_text() + "\n" + bad)
    (tmp_path / "ARCHITECTURE.md").write_text((REPO / "ARCHITECTURE.md").read_text())
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    failures = []
    for check in (test_no_import_goes_up_a_floor, test_no_hidden_imports):
        try:
            check()
        except AssertionError as exc:
            failures.append(str(exc))
    assert any(message in f for f in failures), failures
