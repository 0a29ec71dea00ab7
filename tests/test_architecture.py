"""The layering of docs/ARCHITECTURE.md, checked on every module's imports (function-level ones
included), and the module-size rule."""

import ast
import os

import pytest

PACKAGE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mammojax")

# Lower layers first; a module may import its own top-level package or a lower layer.
LAYERS = (
  ("atomic_files", "console", "host_memory"),
  ("nn",),
  ("data", "metrics"),
  ("losses", "viz"),
  ("models",),
  ("interpret", "train"),
  ("tasks",),
  ("convert", "runs"),
  (
    "main",
    "evaluate",
    "register",
    "ingest",
    "extract_features",
    "ablate",
    "sweep",
    "explain",
    "segment",
    "compare",
    "amae_tables",
    "convert.__main__",
  ),
)
# Commands that build on another command's public function.
ALLOWED_BETWEEN_COMMANDS = {
  ("ablate", "evaluate"),
  ("sweep", "evaluate"),
  ("amae_tables", "evaluate"),
}
MAX_LINES = 500
LONG_MODULE_MARK = "Why one module:"


def _modules():
  for root, _, files in os.walk(PACKAGE_ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        relative = os.path.relpath(path, os.path.dirname(PACKAGE_ROOT))[:-3]
        yield path, relative.replace(os.sep, ".").removesuffix(".__init__")


def _unit(module: str) -> str:
  """The layer unit of a dotted module name: its top-level package, or the command module."""
  parts = module.split(".")[1:]
  if parts[:2] == ["convert", "__main__"]:
    return "convert.__main__"
  return parts[0] if parts else ""


def _rank(unit: str) -> int:
  for rank, units in enumerate(LAYERS):
    if unit in units:
      return rank
  raise AssertionError(f"{unit!r} is in no layer of tests/test_architecture.py: add it")


def _imported(tree: ast.AST) -> list[str]:
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mammojax"):
      if node.module == "mammojax":
        names += [f"mammojax.{alias.name}" for alias in node.names]
      else:
        names.append(node.module)
    elif isinstance(node, ast.Import):
      names += [a.name for a in node.names if a.name.startswith("mammojax.")]
  return names


def test_no_module_imports_upward():
  violations = []
  for path, module in _modules():
    source = _unit(module)
    if not source:
      continue
    with open(path) as f:
      tree = ast.parse(f.read())
    for target_module in _imported(tree):
      target = _unit(target_module)
      same_package = target.split(".")[0] == source.split(".")[0] and "." not in target
      if same_package or (source, target) in ALLOWED_BETWEEN_COMMANDS:
        continue
      if _rank(target) >= _rank(source):
        violations.append(f"{module} imports {target_module}")
  assert not violations, "imports that point upward or sideways:\n" + "\n".join(violations)


@pytest.mark.parametrize("unit", ["train", "losses", "data", "nn"])
def test_layers_the_issue_names_stay_clean(unit):
  # Spelled out because these cycles existed once: tasks <-> train, train -> convert,
  # losses -> models; data and nn never depend on the systems built on them.
  forbidden = {
    "train": ("tasks", "convert", "runs"),
    "losses": ("models", "tasks"),
    "data": ("models", "losses", "tasks", "train"),
    "nn": ("models", "losses", "data", "tasks", "train"),
  }[unit]
  for path, module in _modules():
    if _unit(module) != unit:
      continue
    with open(path) as f:
      imported = _imported(ast.parse(f.read()))
    assert not [m for m in imported if _unit(m) in forbidden], module


def test_long_modules_say_why():
  unexplained = []
  for path, module in _modules():
    with open(path) as f:
      text = f.read()
    if text.count("\n") > MAX_LINES:
      docstring = ast.get_docstring(ast.parse(text)) or ""
      if LONG_MODULE_MARK not in docstring:
        unexplained.append(f"{module} ({text.count(chr(10))} lines)")
  assert not unexplained, (
    f"modules over {MAX_LINES} lines need '{LONG_MODULE_MARK} ...' in their docstring: "
    + ", ".join(unexplained)
  )
