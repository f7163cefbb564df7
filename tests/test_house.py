"""The house rules of the package's imports, checked on the source (AST), function-level imports included.

1. No import cycle between the package's modules: an edge ``A -> B`` is any ``import``/``from``
   statement in ``A`` that loads ``B`` (at module level or inside a function; only
   ``if TYPE_CHECKING:`` blocks, which never run, are left out). Importing ``pkg.mod`` also runs
   ``pkg/__init__``, but that implicit edge is not counted: a package may import its own modules.
2. No private name across modules: ``from pkg.mod import _name`` or ``mod._name`` where ``mod`` is
   another module of the package (dunders such as ``__version__`` are public). The scripts in
   ``classification/``, ``detection/`` and ``bench/`` follow the same rule for what they import
   from the package.

The checker is tested on constructed bad packages too, so that a broken checker cannot pass.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "sj_sfn"
SCRIPT_DIRS = ("classification", "detection", "bench")


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file for every ``.py`` file of ``root/package`` (``__init__`` names the package)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(tree: ast.AST):
    """Every node of ``tree`` with a flag: ``False`` inside ``if TYPE_CHECKING:`` (never executed)."""
    stack = [(tree, True)]
    while stack:
        node, runtime = stack.pop()
        yield node, runtime
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack += [(c, False) for c in node.body] + [(c, runtime) for c in node.orelse]
            continue
        stack += [(c, runtime) for c in ast.iter_child_nodes(node)]


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    """The absolute module that ``from <level dots><target> import ...`` in ``module`` names."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


@dataclass
class _Import:
    line: int
    module: str  # the package module it loads
    name: str | None  # the name taken from it (``from m import name`` when name is not a module)
    runtime: bool


def _imports(tree: ast.AST, module: str, is_pkg: bool, modules: set[str], package: str) -> tuple[list[_Import], dict[str, str]]:
    """The package modules a file imports, and the local names bound to package modules."""
    found: list[_Import] = []
    aliases: dict[str, str] = {}
    for node, runtime in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == package or a.name.startswith(package + "."):
                    found.append(_Import(node.lineno, a.name, None, runtime))
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(module, is_pkg, node.level, node.module)
            if not (src == package or src.startswith(package + ".")):
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in modules:
                    found.append(_Import(node.lineno, sub, None, runtime))
                    aliases[a.asname or a.name] = sub
                else:
                    found.append(_Import(node.lineno, src, a.name, runtime))
    return found, aliases


def _dotted(node: ast.expr) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def check_house(root: pathlib.Path, package: str, script_dirs: tuple[str, ...] = ()) -> list[Problem]:
    """Import cycles and cross-module private names of ``root/package`` (and scripts importing it)."""
    mods = package_modules(root, package)
    names = set(mods)
    problems: list[Problem] = []
    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    files = [(m, p, p.name == "__init__.py") for m, p in mods.items()]
    for d in script_dirs:
        files += [(f"<script {p.relative_to(root)}>", p, False) for p in sorted((root / d).rglob("*.py"))]
    for module, path, is_pkg in files:
        rel = str(path.relative_to(root))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        found, aliases = _imports(tree, module, is_pkg, names, package)
        for imp in found:
            if imp.name is not None and _is_private(imp.name) and imp.module != module:
                problems.append(Problem(rel, imp.line, f"imports the private name {imp.name!r} from {imp.module}"))
            if imp.runtime and module in graph and imp.module in graph and imp.module != module:
                graph[module].setdefault(imp.module, imp.line)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
                continue
            chain = _dotted(node.value)
            if not chain or chain[0] not in aliases:
                continue
            target = aliases[chain[0]]
            for part in chain[1:]:
                if f"{target}.{part}" not in names:
                    target = None
                    break
                target = f"{target}.{part}"
            if target in names and target != module:
                problems.append(Problem(rel, node.lineno, f"uses the private name {node.attr!r} of {target}"))
    for cycle in _cycles(graph):
        steps = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:] + cycle[:1]))
        problems.append(Problem(str(mods[cycle[0]].relative_to(root)), graph[cycle[0]][cycle[1 % len(cycle)]],
                                f"import cycle: {steps} -> {cycle[0]}"))
    return problems


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # a concrete cycle through the component: walk inside it until a module repeats
        members, path, v = set(comp), [], min(comp)
        while v not in path:
            path.append(v)
            v = next(w for w in sorted(graph[v]) if w in members)
        out.append(path[path.index(v):])
    return out


# -- the package ---------------------------------------------------------------------------


def test_the_package_has_no_import_cycle_and_no_cross_module_private_name():
    problems = check_house(ROOT, PACKAGE, SCRIPT_DIRS)
    assert not problems, "house rules broken:\n" + "\n".join(map(str, problems))


def test_the_package_is_walked():
    """The walk sees the package's real edges (a checker that sees nothing would pass anything)."""
    mods = package_modules(ROOT, PACKAGE)
    assert {"sj_sfn", "sj_sfn.functional", "sj_sfn.checks", "sj_sfn.utils", "sj_sfn.cli"} <= set(mods)
    tree = ast.parse(mods["sj_sfn.neuron"].read_text())
    found, _ = _imports(tree, "sj_sfn.neuron", False, set(mods), PACKAGE)
    assert "sj_sfn.functional" in {i.module for i in found}


# -- the checker on constructed packages ---------------------------------------------------


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def test_checker_finds_a_cycle_hidden_inside_a_function(tmp_path):
    root = _write(tmp_path, {
        "bad/__init__.py": "",
        "bad/a.py": "from . import b\n",
        "bad/b.py": "def f():\n    from .c import g\n    return g\n",
        "bad/c.py": "def g():\n    from bad.a import b\n",
    })  # fmt: skip
    problems = check_house(root, "bad")
    assert len(problems) == 1 and "import cycle" in problems[0].what
    assert all(m in problems[0].what for m in ("bad.a", "bad.b", "bad.c"))


def test_checker_finds_a_cycle_through_a_package_init(tmp_path):
    root = _write(tmp_path, {
        "bad/__init__.py": "from .a import f\n",
        "bad/a.py": "def f():\n    from . import g\n",  # the package itself, whose __init__ imports a
    })  # fmt: skip
    assert [p.what for p in check_house(root, "bad") if "cycle" in p.what]


def test_checker_finds_private_names_across_modules(tmp_path):
    root = _write(tmp_path, {
        "bad/__init__.py": "",
        "bad/a.py": "_x = 1\n__version__ = '1'\ndef _f():\n    return _x\n",
        "bad/b.py": "from .a import _f, __version__\n",
        "bad/c.py": "from . import a as A\nimport bad.a\ndef g():\n    return A._x + bad.a._x\n",
        "scripts/run.py": "from bad.a import _f\n",
    })  # fmt: skip
    got = sorted((p.path, p.what) for p in check_house(root, "bad", ("scripts",)))
    assert got == [
        ("bad/b.py", "imports the private name '_f' from bad.a"),
        ("bad/c.py", "uses the private name '_x' of bad.a"),
        ("bad/c.py", "uses the private name '_x' of bad.a"),
        ("scripts/run.py", "imports the private name '_f' from bad.a"),
    ]


def test_checker_accepts_a_clean_package(tmp_path):
    root = _write(tmp_path, {
        "good/__init__.py": "from .a import f\nfrom .b import g\n",
        "good/a.py": "import os\n_own = 1\ndef f():\n    return _own + os.sep.count('/')\n",
        "good/b.py": "from typing import TYPE_CHECKING\nfrom .a import f\nif TYPE_CHECKING:\n    from . import c\n"
                     "def g():\n    return f()\n",
        "good/c.py": "from .b import g\n",
    })  # fmt: skip
    assert check_house(root, "good") == []


@pytest.mark.parametrize("stmt", ["import bad.b", "from bad import b", "from . import b", "from .b import h"])
def test_checker_sees_every_import_form(tmp_path, stmt):
    root = _write(tmp_path, {"bad/__init__.py": "", "bad/a.py": f"{stmt}\n", "bad/b.py": "def h():\n    import bad.a\n"})
    assert [p for p in check_house(root, "bad") if "cycle" in p.what]


# -- one set of parameter checks -------------------------------------------------------------


def test_the_quantile_has_one_rule_everywhere(capsys):
    """p in (0, 1] for the checks, the observers and the command line (SFormer used to demand p > 0.5)."""
    from sj_sfn.calibration import SiteObserver
    from sj_sfn.checks import check_quantile
    from sj_sfn.cli import build_parser

    for ok in (0.4, 0.5, 0.99, 1, 1.0):
        assert check_quantile(ok) == float(ok)
        assert SiteObserver(p=ok).p == float(ok)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            check_quantile(bad)
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            SiteObserver(p=bad)
    parser = build_parser()
    convert = ["convert", "m", "--data", "digits", "--out", "o.pth", "--p"]
    assert parser.parse_args([*convert, "0.4"]).p == 0.4
    with pytest.raises(SystemExit):
        parser.parse_args([*convert, "0"])
    assert "a quantile in (0, 1]" in capsys.readouterr().err
