"""The Colab notebook's cells run (as a script, install cells skipped). The local multi-process
launcher is exercised by test_multihost.py."""

import json
import os
import subprocess
import sys

from bltjax.checkpoint import checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_cells_run(tmp_path):
  with open(os.path.join(REPO, "launch", "colab_quickstart.ipynb")) as f:
    nb = json.load(f)
  code = []
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    lines = [l for l in "".join(cell["source"]).splitlines() if not l.startswith(("!", "%"))]
    code.append("\n".join(lines))
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join(code))
  workdir = str(tmp_path / "wd")
  env = dict(os.environ, JAX_PLATFORMS="cpu", BLTJAX_CONFIG_ARG=":tiny", BLTJAX_WORKDIR=workdir)
  env.pop("XLA_FLAGS", None)
  res = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                       text=True)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "held-out bits per byte" in res.stdout
  assert checkpointer.Checkpointer(workdir).latest_step() == 4
