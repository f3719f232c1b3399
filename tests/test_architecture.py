"""Imports point one way: down the layers of the package, never up.

Every module under ``src/adacs_lightning`` is read with :mod:`ast` (nothing is imported) and
each import of the package it makes, at the top or inside a function, is checked against the
layers below. A module may import modules of its own layer and of the layers under it.

======  ===========  ===========================================================================
layer   name         modules
======  ===========  ===========================================================================
0       ground       errors, choices, configs, schedule, warping, similarity, losses, metrics,
                     momentum, calibration, correspondence, scorer_target, checkpoint_io
1       networks     backbones/, scoring, checkpoint
2       methods      objective, methods/
3       data         data/
4       running      training, callbacks, loggers, figures, fields
5       analysis     evaluation/, sweeps/, refine, registration/
6       interface    cli/, and the package's ``__init__`` (it names the public objects)
======  ===========  ===========================================================================

Besides the order: nothing outside ``cli/`` imports ``cli/`` (it is the top layer), and
``evaluation/`` never imports ``callbacks`` (its figures come from ``figures``). A new module
must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "adacs_lightning"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

LAYERS: dict[str, tuple[str, ...]] = {
    "ground": (
        "errors",
        "choices",
        "configs",
        "schedule",
        "warping",
        "similarity",
        "losses",
        "metrics",
        "momentum",
        "calibration",
        "correspondence",
        "scorer_target",
        "checkpoint_io",
        "devices",
    ),
    "networks": ("backbones", "scoring", "checkpoint"),
    "methods": ("objective", "methods"),
    "data": ("data",),
    "running": ("training", "callbacks", "loggers", "figures", "fields"),
    "analysis": ("evaluation", "sweeps", "refine", "registration"),
    "interface": ("cli", ""),
}
#: (importer, imported) prefixes that are refused whatever their layers.
FORBIDDEN = (
    ("evaluation", "callbacks"),
    # Refinement, registration and evaluation read a run's settings from the run, never training's defaults.
    ("evaluation", "methods.settings"),
    ("refine", "methods.settings"),
    ("registration", "methods.settings"),
)
#: The most lines a module of src/ and a class may have (a longer one holds a second concept).
MAX_FILE_LINES, MAX_CLASS_LINES = 400, 200
ORDER = list(LAYERS)


def _relative(module: str) -> str:
    """``adacs_lightning.data.pairs`` → ``data.pairs``; the package itself → ``""``."""
    return module.removeprefix(PACKAGE).removeprefix(".")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(f"{prefix}.") if prefix else module == ""


def layer_of(module: str) -> str | None:
    """The layer of a module (relative name), by the longest entry of :data:`LAYERS` it falls under."""
    matches = [(len(p), name) for name, prefixes in LAYERS.items() for p in prefixes if _within(module, p)]
    return max(matches)[1] if matches else None


def _modules() -> dict[str, Path]:
    """Relative module name → file, for every module of the package."""
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def package_imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for each import of the package in ``path`` (relative names)."""
    is_package = path.name == "__init__.py"
    here = [PACKAGE, *module.split(".")] if module else [PACKAGE]
    if not is_package:
        here = here[:-1]  # a module's relative imports start from its package
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if _within(alias.name, PACKAGE)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not _within(target, PACKAGE):
                continue
            if node.module is None:  # ``from . import configs``: each name is a module
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, _relative(target)) for line, target in found]


def upward_imports() -> list[str]:
    """One line per import that breaks the layers: where it is, what it imports, and why it is refused."""
    problems = []
    for module, path in _modules().items():
        layer = layer_of(module)
        shown = f"src/{PACKAGE}/{path.relative_to(SOURCE)}"
        if layer is None:
            problems.append(f"{shown}: {module} has no layer: add it to LAYERS in tests/test_architecture.py")
            continue
        for line, target in package_imports(module, path):
            target_layer = layer_of(target)
            if target_layer is None:
                continue  # reported for its own file
            name = f"{PACKAGE}.{target}" if target else PACKAGE
            if ORDER.index(target_layer) > ORDER.index(layer):
                problems.append(
                    f"{shown}:{line}: {module or PACKAGE} ({layer}) imports {name} ({target_layer}), a layer above it"
                )
            for importer, imported in FORBIDDEN:
                if _within(module, importer) and _within(target, imported):
                    problems.append(f"{shown}:{line}: {module} imports {name}; {importer}/ must not import {imported}")
    return problems


def test_every_import_of_the_package_points_down_its_layers():
    problems = upward_imports()
    assert not problems, "Imports that point upward:\n" + "\n".join(problems)


def test_the_reader_resolves_relative_imports_and_names_an_upward_one(tmp_path):
    """The checker itself: relative forms resolve, and an upward import is reported with its place."""
    source = "from ..cli.common import console_main\nfrom . import pairs\nfrom .. import configs\n"
    path = tmp_path / "example.py"
    path.write_text(source)
    assert package_imports("data.example", path) == [(1, "cli.common"), (2, "data.pairs"), (3, "configs")]
    assert layer_of("cli.common") == "interface" and layer_of("data.example") == "data"
    assert layer_of("backbones.adapter") == "networks" and layer_of("checkpoint_io") == "ground"
    assert layer_of("") == "interface" and layer_of("unknown") is None


def test_methods_read_as_outlines():
    """No function or method of ``methods/`` is longer than 50 lines (a longer one hides a second job)."""
    long = []
    for path in sorted((SOURCE / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == [], "\n".join(long)


def test_modules_and_classes_stay_small():
    """No file of src/ over :data:`MAX_FILE_LINES` lines and no class over :data:`MAX_CLASS_LINES`."""
    large = []
    for path in sorted(SOURCE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            large.append(f"{path.relative_to(SOURCE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                large.append(
                    f"{path.relative_to(SOURCE)}:{node.lineno} class {node.name}: {node.end_lineno - node.lineno + 1} lines"
                )
    assert large == [], "\n".join(large)
