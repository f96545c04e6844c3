"""The `muse-jax` command: `muse-jax SUBCOMMAND [--flags]`.

Each subcommand lives in `muse_jax/cli/<name>.py`, which defines its absl flags and a
`main(argv)`; it is imported only when asked for, so one command's flags (and its
heavy imports) never slow down another. The logic is in libraries that are tested.
"""

from collections.abc import Callable, MutableMapping
import importlib
import os
import pathlib
import sys

from absl import app, flags, logging

from muse_jax import host_memory

# name -> (module, one line of help). Keep sorted by the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
  "demo": (
    "muse_jax.cli.demo",
    "The demo: train Muse on the synthetic shapes set, generate, judge every image.",
  ),
  "sample": ("muse_jax.cli.sample", "Generate images from text prompts with a run's pipeline."),
  "inpaint": (
    "muse_jax.cli.inpaint",
    "Regenerate the masked region of an image to match a prompt.",
  ),
  "outpaint": ("muse_jax.cli.outpaint", "Extend an image beyond its borders to match a prompt."),
  "edit": ("muse_jax.cli.edit", "Mask-free editing: re-sample an image's tokens toward a prompt."),
  "make-shapes": ("muse_jax.cli.make_shapes", "Write the synthetic shapes set as a folder."),
  "preencode": (
    "muse_jax.cli.preencode",
    "Pre-encode a data source: VQ token ids + text embeddings.",
  ),
  "encode-text": (
    "muse_jax.cli.encode_text",
    "Pre-encode captions with a frozen T5/CLIP text encoder.",
  ),
  "train-vq": ("muse_jax.cli.train_vq", "Train a VQGAN image tokenizer (or finetune its decoder)."),
  "reconstruct": (
    "muse_jax.cli.reconstruct",
    "Reconstruct images through a tokenizer; PSNR, codebook usage.",
  ),
  "train": (
    "muse_jax.cli.train",
    "Train a Muse base or super-res transformer (resumes by itself).",
  ),
  "average-checkpoints": (
    "muse_jax.cli.average_checkpoints",
    "Average checkpoints offline (EMA, decay 0.7) into a new one.",
  ),
  "convert": (
    "muse_jax.cli.convert",
    "Convert published weights (aMUSEd) into a run folder to sample.",
  ),
}

# Commands whose terminal output is for a person (their own lines, progress bars and one
# summary), run with absl logging at WARNING: restoring one checkpoint otherwise prints
# ~45 INFO lines of orbax's into the progress bar. `-v 0` brings INFO back. The trainers
# and data jobs keep INFO: their log lines are the run's record.
QUIET_COMMANDS = frozenset(
  {"demo", "sample", "inpaint", "outpaint", "edit", "make-shapes", "reconstruct", "convert"}
)


def quiet_unless_asked(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """``main`` run with logging at WARNING unless ``--verbosity`` / ``-v`` was given."""

  def quiet_main(argv: list[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    main(argv)

  return quiet_main


def enable_compile_cache(environ: MutableMapping[str, str] = os.environ) -> None:
  """Turns on JAX's persistent compilation cache unless the user configured it.

  A command's compiled programs (an aMUSEd-size decode loop takes 40-130 s to compile on
  a CPU) are then reused by every later command with the same shapes. The cache lives in
  ``$XDG_CACHE_HOME/muse_jax/xla`` (``~/.cache/...``); set ``JAX_COMPILATION_CACHE_DIR``
  to move it, or to an empty string to turn it off. Set before jax is imported.
  """
  root = environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
  environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(root) / "muse_jax" / "xla"))
  # Only programs that took a while to compile: tiny ones are faster to rebuild than to read.
  environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1.0")


def _usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
  return (
    "usage: muse-jax COMMAND [--flag=value ...]\n\ncommands:\n"
    + "\n".join(lines)
    + "\n\n`muse-jax COMMAND --help` explains a command's flags. The commands that make"
    + "\nimages show their own progress only; `-v 0` adds the libraries' INFO logs."
  )


def run(argv: list[str] | None = None) -> None:
  """Console-script entry point."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    return
  name = argv[1]
  if name not in COMMANDS:
    sys.exit(
      f"muse-jax: unknown command {name!r}; expected one of {', '.join(COMMANDS)}.\n\n{_usage()}"
    )
  enable_compile_cache()
  host_memory.reuse_freed_memory()  # before jax starts its threads
  module = importlib.import_module(COMMANDS[name][0])
  prog = f"muse-jax {name}"
  if any(a in ("-h", "--help", "-help") for a in argv[2:]):
    doc = (module.__doc__ or COMMANDS[name][1]).strip()
    print(f"usage: {prog} [--flag=value ...]\n\n{doc}\n\nflags:\n{flags.FLAGS.module_help(module)}")
    return
  main = quiet_unless_asked(module.main) if name in QUIET_COMMANDS else module.main
  app.run(main, argv=[prog, *argv[2:]])


if __name__ == "__main__":
  run()
