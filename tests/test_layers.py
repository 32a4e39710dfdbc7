"""The package's layering: each module imports only from its own layer or the layers below it.

The order follows the flow of the work: the quantization core every layer uses, the data, the models,
sampling, then what runs the model (pretraining, metrics, the PTQ methods), the selector, and the
programs on top. Imports inside functions count as much as module-level ones.
"""

from __future__ import annotations

import ast
import pathlib

import qlip_jax

ROOT = pathlib.Path(qlip_jax.__file__).parent

#: Layer of each top-level module or subpackage of ``qlip_jax``; a module may import from a layer of
#: the same or a lower number.
LAYERS = {
    "errors": 0, "atomic": 0, "naming": 0, "memory": 0, "compile_cache": 0, "assets": 0, "distributed": 0,
    "quant": 1,
    "data": 2,
    "models": 3,
    "sampling": 4,
    "training": 5, "metrics": 5,
    "ptq": 6,
    "selector": 7,
    "evaluation": 8, "plots": 8, "programs": 8,
    "cli": 9, "__init__": 9,
}

#: Known upward imports, each with its reason. Keep this list short.
EXCEPTIONS = {
    # the SD folder's scheduler config is read with the model; the dataclass lives with the samplers
    ("models.sd", "sampling"),
    # the scene source's extra scorer is the scene parser (imported when the scorer is first called)
    ("data.sources", "metrics"),
}


def _layer_of(parts: list[str]) -> str:
    return parts[0] if parts else "__init__"


def _imports(path: pathlib.Path) -> set[str]:
    """Top-level ``qlip_jax`` names (``quant``, ``models``, ...) that ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "qlip_jax":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from qlip_jax import x
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "qlip_jax" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_module_has_a_layer():
    tops = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert tops - set(LAYERS) == set()


def test_imports_point_down():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(rel)
        own = LAYERS[_layer_of(list(rel))]
        for name in _imports(path):
            if LAYERS[name] > own and (module, name) not in EXCEPTIONS:
                upward.append(f"{module} (layer {own}) imports {name} (layer {LAYERS[name]})")
    assert upward == []


def test_the_exceptions_are_still_needed():
    """An exception whose import is gone is removed from the list, so the list stays the truth."""
    for module, name in EXCEPTIONS:
        assert name in _imports(ROOT.joinpath(*module.split(".")).with_suffix(".py")), (module, name)
