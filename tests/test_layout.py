"""The package's layout: commands at the top, role packages that only import downwards, no
import cycles, function-local imports only for heavy optional dependencies, thin commands."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "bltjax"

# What a user runs: `python -m bltjax.<command>`. Nothing else sits at the top of the package.
COMMANDS = ("main", "generate", "convert", "export", "evaluate", "preprocess", "plot", "ablate",
            "aot", "bench")
# Role package -> the role packages its modules may import (besides its own modules). Commands
# (and `bench`, a command package) may import every role package, but no other command.
LAYERS = {
    "runtime": (),
    "model": ("runtime",),
    "data": ("runtime", "model"),
    "checkpoint": ("runtime",),
    "interop": ("runtime", "model"),
    "viz": ("runtime", "model"),
    "train": ("runtime", "model", "data", "checkpoint", "viz"),
    "inference": ("runtime", "model", "data", "checkpoint", "interop"),
}
# The only imports a function may make instead of its module: heavy dependencies that a caller
# may not have installed or should not pay for, and the bltjax modules that bring them in.
LAZY = {
    "matplotlib": "the [plot] extra; only drawing needs it",
    "torch": "the [pth]/[test] extras; only Meta's .pth files and the port benchmark need it",
    "transformers": "the [test] extra; only the port benchmark needs it",
    "lm_eval": "the [eval] extra; only lm-evaluation-harness runs need it",
    "tokenizers": "only token_lm runs need it (1 s to import)",
    "wandb": "an optional metrics sink",
    "PIL": "comes with matplotlib (the [plot] extra); only the TensorBoard entropy image needs it",
    "google.auth": "only a check of real Cloud Storage needs it (0.4 s with requests), and "
                   "bltjax.runtime.storage is imported almost everywhere",
    "bltjax.checkpoint.checkpointer": "Orbax (1.2 s, threads) stays out of grain workers and "
                                      "of model-only uses",
    "bltjax.inference.api": "`import bltjax` stays light (bltjax/__init__.py)",
    "bltjax.inference.harness": "lm_eval at import (the [eval] extra)",
    "bltjax.model.tokenizer": "`import bltjax` stays light (bltjax/__init__.py)",
}


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: pathlib.Path = ROOT) -> dict:
  """{module: {imported bltjax module: 'module' | 'function'}}, from the source with `ast`:
  every import statement, at module level or inside functions; `from pkg import name` counts
  as importing pkg.name when that is a module, else pkg."""
  files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
  graph = {}
  for name, path in files.items():
    tree = ast.parse(path.read_text(), str(path))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                              ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    edges = graph.setdefault(name, {})
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolved against this module's package
          package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
          base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                   for a in node.names]
      where = "function" if id(node) in nested else "module"
      for target in targets:
        if target.split(".")[0] != root.name:
          if where == "function":
            edges.setdefault(target, where)
          continue
        while target not in files:  # bltjax.a.b.Name -> bltjax.a.b
          target = target.rpartition(".")[0]
        if target != name and edges.get(target) != "module":
          edges[target] = where
  return graph


def find_cycle(graph: dict) -> list | None:
  """One import cycle (a list of modules, first == last), or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in graph.get(m, {}):
      if n not in graph:
        continue
      if state.get(n) == "open":
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def role(module: str) -> str:
  """'runtime', 'model', ... for a library module; 'command' for bltjax.<command> and the bench
  package; 'root' for bltjax itself."""
  parts = module.split(".")
  if len(parts) == 1:
    return "root"
  if parts[1] in COMMANDS:
    return "command"
  return parts[1]


def layer_violations(graph: dict) -> list[str]:
  """Imports that point up or sideways between role packages, or from one command to another."""
  out = []
  for m, edges in sorted(graph.items()):
    src = role(m)
    for target in sorted(t for t in edges if t in graph):
      dst = role(target)
      if src == dst and src != "command":
        continue
      if src == "command":  # the bench package's modules may import each other
        in_bench = all(x.split(".")[:2] == ["bltjax", "bench"] for x in (m, target))
        ok = dst in LAYERS or dst == "root" or in_bench
      elif src == "root":
        ok = dst in LAYERS
      else:
        ok = dst in LAYERS.get(src, ())
      if not ok:
        out.append(f"{m} ({src}) imports {target} ({dst})")
  return out


def lazy_violations(graph: dict) -> list[str]:
  return [f"{m} imports {t} inside a function" for m, edges in sorted(graph.items())
          for t, where in sorted(edges.items())
          if where == "function" and not any(t == k or t.startswith(k + ".") for k in LAZY)]


def test_only_commands_and_role_packages_at_the_top():
  modules = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
  packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
  assert modules | packages == (set(COMMANDS) - {"bench"}) | {"bench"} | set(LAYERS)
  assert "bench" in packages  # a command package: python -m bltjax.bench <what>


def test_the_import_graph_is_acyclic():
  assert find_cycle(import_graph()) is None


def test_role_packages_only_import_downwards():
  assert layer_violations(import_graph()) == []


def test_function_local_imports_are_only_the_declared_heavy_ones():
  assert lazy_violations(import_graph()) == []


def _write(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checks_catch_a_cycle_an_upward_import_and_a_lazy_import(tmp_path):
  """The checks above would fail: on a small tree with the three faults."""
  root = tmp_path / "bltjax"
  _write(root, {
      "__init__.py": "",
      "model/__init__.py": "",
      "model/blt.py": "from bltjax.train import step\n",  # model -> train: upwards
      "train/__init__.py": "",
      "train/step.py": "def f():\n  from bltjax.train import trainer\n",  # a lazy import...
      "train/trainer.py": "from bltjax.train import step\n",  # ... that hides a cycle
  })
  graph = import_graph(root)
  assert find_cycle(graph) in (["bltjax.train.step", "bltjax.train.trainer", "bltjax.train.step"],
                               ["bltjax.train.trainer", "bltjax.train.step",
                                "bltjax.train.trainer"])
  assert layer_violations(graph) == ["bltjax.model.blt (model) imports bltjax.train.step (train)"]
  assert lazy_violations(graph) == ["bltjax.train.step imports bltjax.train.trainer inside a "
                                    "function"]


def _command_body_is_thin(path: pathlib.Path) -> list[str]:
  """What a command holds beyond its docstring, imports, module-level flags, `main` and
  `cli.run(main)` under __main__."""
  tree = ast.parse(path.read_text())
  extra = []
  for i, node in enumerate(tree.body):
    if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
      continue  # docstring
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    if isinstance(node, (ast.Assign, ast.Expr)):
      call = node.value
      if isinstance(call, ast.Call) and "DEFINE" in ast.unparse(call.func) or \
          isinstance(call, ast.Call) and ast.unparse(call.func).startswith("flags."):
        continue
    if isinstance(node, ast.FunctionDef) and node.name == "main":
      continue
    if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
      body = [ast.unparse(n) for n in node.body]
      if len(body) == 1 and body[0].startswith("cli.run(main"):
        continue
    extra.append(ast.unparse(node).splitlines()[0])
  return extra


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_are_thin(command):
  path = ROOT / f"{command}.py" if command != "bench" else ROOT / "bench" / "__main__.py"
  assert _command_body_is_thin(path) == []


def test_importing_a_command_starts_no_jax_backend():
  """cli.run sets the XLA flags before the first backend starts: no command may start one on
  import (one process per command: their flags share absl's registry)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = {c: subprocess.Popen(
      [sys.executable, "-c", f"import bltjax.{c if c != 'bench' else 'bench.__main__'}\n"
       "from jax._src import xla_bridge\n"
       "assert not xla_bridge.backends_are_initialized()"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for c in COMMANDS}
  failed = {c: p.communicate(timeout=300)[0][-2000:] for c, p in procs.items()}
  assert {c: out for c, out in failed.items() if procs[c].returncode} == {}
