"""The sub-packages of neurosim form layers, and imports only go downward: a module may import
its own sub-package and those below it, never one above (``docs/design.md`` draws the map)."""

import ast
from pathlib import Path

import neurosim

# bottom to top
LAYERS = ["common", "rules", "core", "models", "data", "observe", "training", "tools"]
PACKAGE = Path(neurosim.__file__).parent


def _imports(path: Path):
    """Every neurosim module ``path`` imports, at module level or inside a function."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name
            if name == "neurosim":  # from neurosim import core → the sub-package core
                yield from (f"neurosim.{a.name}" for a in node.names)


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "neurosim" and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules outside the sub-packages: {loose}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)


def test_imports_only_go_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if own is None:
            continue  # neurosim/__init__.py and __main__.py: the package's front door
        for name in _imports(path):
            other = _layer(name)
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE.parent)} ({own}) imports {name} ({other})")
    assert not upward, "imports that go up:\n" + "\n".join(upward)


def test_each_layer_says_what_it_owns_and_may_import():
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text(encoding="utf-8")))
        assert doc and ("may import" in doc.lower() or "imports nothing" in doc.lower()), layer
