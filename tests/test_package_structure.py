"""Package structure (DESIGN §4: one concept per file; §2.2.1: callbacks use only public helpers), read from the
source with ``ast`` (nothing is imported):

- the module-level imports among the package's modules form no cycle (imports under ``if TYPE_CHECKING:`` and
  inside functions, lazy ones, are allowed to close a loop);
- no callback reaches into a private member (``x._name``) or imports a private name of another file, and the
  strategy uses only the module's public surface.

``callbacks/`` is installed as ``fl_lightning.callbacks`` (``[tool.setuptools.package-dir]`` in pyproject.toml),
so its files are named as modules of that package here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fl_lightning"
# directory -> the dotted package it installs as (pyproject.toml [tool.setuptools.package-dir])
SOURCES = {ROOT / "fl_lightning": "fl_lightning", ROOT / "callbacks": "fl_lightning.callbacks"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out: dict[str, Path] = {}
    for top, dotted in SOURCES.items():
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([dotted, *parts])] = path
    return out


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at top level and inside top-level ``if`` (but not the body of
    ``if TYPE_CHECKING:``), ``try`` and ``with`` blocks and class bodies; not inside functions."""

    def walk(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    yield from walk(node.body)
                yield from walk(node.orelse)  # the else branch of `if TYPE_CHECKING:` runs
            elif isinstance(node, ast.Try):
                for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                    yield from walk(block)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                yield from walk(node.body)
            # FunctionDef / AsyncFunctionDef / Lambda bodies: lazy imports, allowed to close a loop

    yield from walk(tree.body)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules an import statement loads (``from pkg import sub`` loads ``pkg.sub`` when it is a
    submodule, else ``pkg`` itself)."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in MODULES:
                found.add(alias.name)
        return found
    source = _resolve(module, node)
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in MODULES:
            found.add(sub)
        elif source in MODULES:
            found.add(source)
    return found


def _parents(module: str) -> set[str]:
    """The packages Python imports before ``module`` (``a.b.c`` -> ``a``, ``a.b``)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(MODULES)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules its module-level imports load: the named modules, and their parent packages
    (importing ``fl_lightning.callbacks.base`` first runs ``callbacks/__init__.py``), except the importer's own
    parents, which are already being imported when it runs."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for node in _module_level_imports(tree):
            for target in _targets(name, node):
                targets |= {target} | _parents(target)
        graph[name] = targets - {name} - _parents(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (``[a, b, ..., a]``), or None (iterative depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path: list[str] = [start]
        stack: list[Iterator[str]] = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_source_tree_is_the_package_the_checks_read() -> None:
    """The checks below read the files they should: every callback and core module is found under its installed
    name, and the graph has the edges the source plainly has (so an empty graph cannot pass vacuously)."""
    assert {"fl_lightning.module", "fl_lightning.round", "fl_lightning.cohort", "fl_lightning.callbacks",
            "fl_lightning.callbacks.base", "fl_lightning.callbacks.control_variates",
            "fl_lightning.data.datamodule"} <= set(MODULES)
    graph = import_graph()
    assert "fl_lightning.callbacks.base" in graph["fl_lightning.callbacks.control_variates"]
    assert "fl_lightning.round" in graph["fl_lightning.callbacks.base"]
    # module.py imports fl_lightning.callbacks.base, which first runs callbacks/__init__.py
    assert "fl_lightning.callbacks" in graph["fl_lightning.module"]
    # fl_lightning/__init__.py imports its classes lazily (TYPE_CHECKING + __getattr__): no module-level edge
    assert graph["fl_lightning"] == set()
    # round.py imports the module only for type checking: not an edge
    assert "fl_lightning.module" not in graph["fl_lightning.round"]


def test_find_cycle_reports_a_cycle_and_accepts_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_module_level_imports_form_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle among the package's modules: " + " -> ".join(cycle or [])


# ------------------------------------------------------------------------------------- private members
# Private attributes of other files that a callback may use anyway: (file, attribute) -> why. Keep it short; a
# Lightning-private *hook* documented for subclasses belongs here, a private attribute of someone else's object
# does not. (``self._generate_state_key(...)`` of Lightning's Callback is a call on ``self``, allowed anyway.)
ALLOWED: dict[tuple[str, str], str] = {
    ("progress.py", "_leave"): "Lightning's TQDMProgressBar keeps its `leave` argument only as `_leave` (no public "
                               "accessor); copying it keeps a user's setting when the bar is swapped",
}
SELF_NAMES = {"self", "cls"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_private_names(tree: ast.Module) -> set[str]:
    """Private names a file defines: functions/classes/methods it defs, and attributes, variables and arguments it
    assigns (``self._x = ...``, ``obj._x = ...``, ``_X = ...``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _is_private(n)}


def _label(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def private_accesses(path: Path, receivers: set[str] | None = None,
                     foreign: set[str] | None = None) -> list[str]:
    """``file:line: expr._name`` for every read of a private attribute ``_name`` on something other than
    ``self``/``cls`` that the file does not define itself. With ``receivers``, only accesses on those names (or on
    attributes of that name, ``x.<receiver>._name``) — or of a name in ``foreign`` on any receiver — count."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = defined_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _is_private(node.attr)):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in SELF_NAMES:
            continue
        if node.attr in own or (path.name, node.attr) in ALLOWED:
            continue
        if receivers is not None:
            tail = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            if tail not in receivers and node.attr not in (foreign or set()):
                continue
        found.append(f"{_label(path)}:{node.lineno}: {ast.unparse(node)}")
    return found


def private_imports(path: Path) -> list[str]:
    """``file:line: from m import _name`` for every private name imported from another module (a private helper
    used across files should be made public, with a name and a docstring)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"{_label(path)}:{node.lineno}: from {node.module} import {alias.name}")
    return found


CALLBACK_FILES = sorted((ROOT / "callbacks").glob("*.py"))


def test_the_private_access_check_flags_foreign_members_only(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "class A:\n"
        "    def __init__(self, other):\n"
        "        self._mine = 1\n"
        "        other._set_here = 2\n"
        "    def _helper(self):\n"
        "        return self._mine + self._on_self + self.__class__.__name__.__len__()\n"
        "    def use(self, other, trainer):\n"
        "        return other._set_here, other._helper(), trainer._private_attr, trainer.strategy._hidden\n"
    )
    assert [line.split(": ", 1)[1] for line in private_accesses(source)] == [
        "trainer._private_attr", "trainer.strategy._hidden"]
    # restricted to receivers named "module" (plus the foreign name _d on any receiver)
    source.write_text("def f(module, trainer):\n    return module._a, trainer.module._b, trainer._c, trainer._d\n")
    found = private_accesses(source, receivers={"module"}, foreign={"_d"})
    assert [line.split(": ", 1)[1] for line in found] == ["module._a", "trainer.module._b", "trainer._d"]
    source.write_text("from fl_lightning.ops import _check_density, topk\nfrom .x import _y as y\n")
    assert [line.split(": ", 1)[1] for line in private_imports(source)] == [
        "from fl_lightning.ops import _check_density", "from x import _y"]


@pytest.mark.parametrize("path", CALLBACK_FILES, ids=[p.name for p in CALLBACK_FILES])
def test_callbacks_touch_no_private_member_of_another_file(path: Path) -> None:
    """DESIGN §2.2.1: a callback uses the module's public helpers only (and Lightning's public API)."""
    found = private_accesses(path)
    assert not found, "private members of other files:\n" + "\n".join(found)


@pytest.mark.parametrize("path", CALLBACK_FILES, ids=[p.name for p in CALLBACK_FILES])
def test_callbacks_import_no_private_name_of_another_file(path: Path) -> None:
    found = private_imports(path)
    assert not found, "private names imported from other files:\n" + "\n".join(found)


def _module_private_members() -> set[str]:
    """Private members FederatedLightningModule defines (module.py's own private names)."""
    tree = ast.parse(MODULES["fl_lightning.module"].read_text(encoding="utf-8"))
    return defined_private_names(tree)


def test_the_strategy_uses_only_the_modules_public_members() -> None:
    """The strategy works on any module with the ``ShardedClients`` surface (clients.py), so it must not reach
    into FederatedLightningModule's private state: no ``module._x`` / ``self.lightning_module._x`` /
    ``pl_module._x``, and none of module.py's private names on any receiver."""
    path = MODULES["fl_lightning.strategy"]
    module_names = {"module", "pl_module", "lightning_module", "model"}
    found = private_accesses(path, receivers=module_names, foreign=_module_private_members())
    assert not found, "the strategy reads private members of the module:\n" + "\n".join(found)
