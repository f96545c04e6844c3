"""The `muse-jax` command: subcommand listing, dispatch, errors, and the demo."""

import os
import pathlib
import subprocess
import sys

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


_HELP_OF_EVERY_COMMAND = """
import sys
from absl import flags
from muse_jax import main

for name, (module, _) in main.COMMANDS.items():
  # Each command runs in its own process, so two commands may define flags of the same
  # name; here they share one, so forget one command's flags before importing the next.
  for flag in list(flags.FLAGS):
    if (flags.FLAGS.find_module_defining_flag(flag) or "").startswith("muse_jax.cli"):
      delattr(flags.FLAGS, flag)
  for loaded in [m for m in sys.modules if m.startswith("muse_jax.cli.")]:
    del sys.modules[loaded]
  print(f"=== {name} {module}")
  main.run(["muse-jax", name, "--help"])
"""


def test_every_command_imports_and_explains_its_flags():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", _HELP_OF_EVERY_COMMAND],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
  )
  assert result.returncode == 0, result.stderr
  sections = result.stdout.split("=== ")[1:]
  assert len(sections) == len(main.COMMANDS)
  for section in sections:
    name = section.split()[0]
    assert f"usage: muse-jax {name}" in section
    assert section.count("  --") >= 1, f"{name} --help lists no flags"


def test_quiet_commands_are_commands():
  assert main.QUIET_COMMANDS <= set(main.COMMANDS)
  assert not {"train", "train-vq"} & main.QUIET_COMMANDS  # their logs are the run's record


def test_unknown_command_names_the_known_ones():
  result = muse_jax("smaple")
  assert result.returncode != 0
  assert "unknown command 'smaple'" in result.stderr and "demo" in result.stderr


def test_demo_without_workdir_is_one_line_of_error():
  result = muse_jax("demo")
  assert result.returncode != 0
  assert "--workdir is required" in result.stderr
  assert "Traceback" not in result.stderr


def test_compile_cache_defaults_and_respects_the_user(tmp_path):
  env = {"XDG_CACHE_HOME": str(tmp_path)}
  main.enable_compile_cache(env)
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "muse_jax" / "xla")
  assert float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]) > 0
  mine = {"JAX_COMPILATION_CACHE_DIR": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "5"}
  main.enable_compile_cache(mine)  # an empty dir turns the cache off; left as given
  assert mine == {
    "JAX_COMPILATION_CACHE_DIR": "",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "5",
  }


def test_reconstruct_without_its_images_is_one_line_of_error(tmp_path):
  result = muse_jax(
    "reconstruct",
    f"--checkpoint={ROOT / 'tests' / 'fixtures' / 'vq' / 'amused_tiny'}",
    f"--images={tmp_path / 'missing'}",
    f"--out={tmp_path / 'out'}",
  )
  assert result.returncode != 0
  assert "muse-jax reconstruct: no folder of images at" in result.stderr
  assert "Traceback" not in result.stderr
