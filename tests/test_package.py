"""The package's public names resolve, lazily; the house keeps its shape: packages by layer importing
one way, short functions, short signatures."""

import ast
import subprocess
import sys
from pathlib import Path

import preftune


def test_every_public_name_resolves():
    for name in preftune.__all__:
        assert getattr(preftune, name) is not None, name


def test_importing_the_package_does_not_import_the_training_stack():
    code = "import sys, preftune; print('accelerate' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- the shape of the house

SRC = Path(preftune.__file__).parent

LAYERS = (
    ("cli",),
    ("experiments",),
    ("recipes",),
    ("engine", "evaluation"),
    ("generation",),
    ("model", "losses"),
    ("data",),
    ("config",),
    ("errors", "distributed"),
)
"""The packages from the top floor down (docs/design.md draws them): a module imports only from its
own package and from the floors below it, never from above or from a sibling on its floor."""

MAX_LINES, MAX_PARAMETERS, MAX_TOP_LEVEL = 80, 8, 12


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(SRC)), ast.parse(path.read_text())) for path in sorted(SRC.rglob("*.py"))]


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    return [
        (name, node)
        for name, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def _floor(package: str) -> int:
    return next(i for i, floor in enumerate(LAYERS) if package in floor)


def _imported_packages(path: str, tree: ast.Module) -> set[str]:
    """The top-level preftune packages a module imports, at module level or inside functions."""
    here = path.split("/")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [alias.name for alias in node.names]
            found.add(target[0] if target else names[0])
        elif isinstance(node, ast.ImportFrom | ast.Import):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for module in modules:
                if module and module.startswith("preftune."):
                    found.add(module.split(".")[1])
    return found


def test_the_top_of_the_package_holds_at_most_twelve_packages_and_modules():
    entries = [
        p.name
        for p in SRC.iterdir()
        if (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))
        or (p / "__init__.py").exists()
    ]
    assert len(entries) <= MAX_TOP_LEVEL, sorted(entries)
    assert {p.removesuffix(".py") for p in entries} == {name for floor in LAYERS for name in floor}


def test_packages_import_only_from_the_floors_below_them():
    upward = []
    for path, tree in _modules():
        package = path.split("/")[0].removesuffix(".py")
        if package in ("__init__", "__main__"):
            continue
        for other in _imported_packages(path, tree) - {package}:
            if _floor(other) <= _floor(package):
                upward.append(f"{path} imports {other}")
    assert not upward


def test_no_function_is_longer_than_80_lines():
    long = [f"{path}:{f.name} {f.end_lineno - f.lineno + 1}" for path, f in _functions()
            if f.end_lineno - f.lineno + 1 > MAX_LINES]  # fmt: skip
    assert not long


def test_no_function_takes_more_than_8_parameters():
    def count(f: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        a = f.args
        total = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
        return total - bool(a.args and a.args[0].arg in ("self", "cls"))

    many = [f"{path}:{f.name} {count(f)}" for path, f in _functions() if count(f) > MAX_PARAMETERS]
    assert not many
