"""launch/amused_colab.ipynb runs, cell by cell, on the tiny aMUSEd folder of the fixtures.

The notebook is what a Colab user runs first; nothing else would notice when an API it calls
changes. Its install and download cells are skipped (the test brings its packages and its
folder); its shell lines (`!muse-jax convert ...`) run as the notebook would run them.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOK = ROOT / "launch" / "amused_colab.ipynb"
AMUSED = pathlib.Path(__file__).parent / "fixtures" / "amused" / "pipeline"


def _code_cells() -> list[str]:
  cells = json.loads(NOTEBOOK.read_text())["cells"]
  return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _shell(line: str, namespace: dict) -> None:
  """One `!command {VAR}` line, with IPython's substitution of the notebook's variables."""
  argv = shlex.split(line[1:].strip().format(**namespace))
  if argv[:1] == ["huggingface-cli"]:
    return  # the download: the test brings its folder
  assert argv[0] == "muse-jax", f"unexpected shell line in the notebook: {line}"
  result = subprocess.run(
    [sys.executable, "-m", "muse_jax.main", *argv[1:]],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0, f"{line}: {result.stderr}"


@pytest.mark.slow
def test_notebook_runs_on_the_tiny_amused_folder(tmp_path):
  cells = _code_cells()
  namespace: dict = {"__name__": "__colab__"}
  ran = 0
  for source in cells:
    if "pip" in source and "install" in source:
      continue  # the install cell
    python = "\n".join(line for line in source.splitlines() if not line.startswith("!"))
    exec(compile(python, str(NOTEBOOK), "exec"), namespace)
    if "SRC" in namespace and namespace["SRC"] != str(AMUSED):
      namespace.update(SRC=str(AMUSED), RUN=str(tmp_path / "run"))  # the user's folders
    for line in source.splitlines():
      if line.startswith("!"):
        _shell(line, namespace)
    ran += 1
  assert ran == len(cells) - 1, "every cell but the install one runs"

  pipe = namespace["pipe"]
  size = pipe.resolution
  images, edits, inpainted = namespace["images"], namespace["edits"], namespace["inpainted"]
  assert images.shape == (4, size, size, 3) and images.dtype == np.uint8
  assert len(edits) == 3 and all(e.shape == (size, size, 3) for e in edits)
  assert inpainted.shape == (2, size, size, 3)
  assert isinstance(namespace["show"](images), Image.Image)
