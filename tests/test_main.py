"""The `muse-jax` command: subcommand listing, dispatch, errors, and the demo."""

import os
import pathlib
import subprocess
import sys

from absl import flags
from PIL import Image

from muse_jax import main

ROOT = pathlib.Path(__file__).parents[1]


def muse_jax(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "muse_jax.main", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=timeout,
  )


def test_help_lists_every_command_with_one_line(capsys):
  main.run(["muse-jax", "--help"])
  out = capsys.readouterr().out
  for name, (_, help_) in main.COMMANDS.items():
    assert f"  {name}" in out and help_ in out


def test_every_command_module_imports_and_explains_its_flags(capsys):
  # Each command runs in its own process, so two commands may define flags of the same
  # name; here they share one, so forget one command's flags before importing the next.
  for name, (module, _) in main.COMMANDS.items():
    for flag in list(flags.FLAGS):
      if (flags.FLAGS.find_module_defining_flag(flag) or "").startswith("muse_jax.cli"):
        delattr(flags.FLAGS, flag)
    for loaded in [m for m in sys.modules if m.startswith("muse_jax.cli.")]:
      del sys.modules[loaded]
    main.run(["muse-jax", name, "--help"])
    out = capsys.readouterr().out
    mod = sys.modules[module]
    assert callable(mod.main), name
    assert mod.__doc__ and mod.__doc__.strip().splitlines()[0] in out, f"{module} needs a docstring"
    assert out.count("  --") >= 1, f"{name} --help lists no flags"


def test_unknown_command_names_the_known_ones():
  result = muse_jax("smaple")
  assert result.returncode != 0
  assert "unknown command 'smaple'" in result.stderr and "demo" in result.stderr


def test_demo_runs_and_writes_the_decoding_grid(tmp_path):
  result = muse_jax(
    "demo", f"--workdir={tmp_path}", "--config=configs/demo.py:tiny", "--config.sampler.num_steps=3"
  )
  assert result.returncode == 0, result.stderr
  assert "decoded 2 images" in result.stdout
  image = Image.open(tmp_path / "decode.png")
  # 2 prompts x 3 steps of 8x8 tokens at 8 pixels per token.
  assert image.size == (3 * 8 * 8, 2 * 8 * 8)


def test_demo_without_workdir_is_one_line_of_error():
  result = muse_jax("demo")
  assert result.returncode != 0
  assert "--workdir is required" in result.stderr
  assert "Traceback" not in result.stderr
