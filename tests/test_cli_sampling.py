"""The sampling commands (sample, inpaint, outpaint, edit): outputs and one-line errors."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from run_factory import make_run

ROOT = pathlib.Path(__file__).parents[1]


def muse_jax(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "muse_jax.main", *map(str, args)],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
  )  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return make_run(tmp_path_factory.mktemp("run"), superres=False, num_steps=2)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
  Image.fromarray(rgb).convert("P").save(folder / "photo.png")  # palette mode: converted
  mask = np.zeros((40, 40), np.uint8)
  mask[10:30, 20:] = 255
  Image.fromarray(mask).save(folder / "mask.png")
  Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "empty_mask.png")
  Image.fromarray(mask[:, :32]).save(folder / "narrow_mask.png")  # 32 wide, 40 high
  (folder / "notes.txt").write_text("not an image")
  return folder


def test_sample_writes_a_captioned_grid_and_each_image(run, tmp_path):
  out = tmp_path / "grid.png"
  result = muse_jax("sample", f"--checkpoint={run}", "--prompt=a red circle", "--prompt=a blue square",
                    "--num-images=2", "--save-each", f"--out={out}", "--num-steps=2")  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert "wrote 4 image(s) of 16x16" in result.stdout
  # Progress bars and results only: no INFO lines of the libraries' (orbax logs ~45 per
  # checkpoint it restores) unless -v asks for them.
  assert not re.search(r"^I\d{4} ", result.stderr, re.M), result.stderr[:2000]
  assert Image.open(out).size[0] > 2 * 16
  each = sorted(tmp_path.glob("grid-*.png"))
  assert len(each) == 4 and Image.open(each[0]).size == (16, 16)


def test_editing_commands_write_images(run, photo, tmp_path):
  for command, extra in [
    ("inpaint", [f"--image={photo / 'photo.png'}", f"--mask={photo / 'mask.png'}"]),
    ("outpaint", [f"--image={photo / 'photo.png'}", "--direction=left,up", "--size=4"]),
    ("edit", [f"--image={photo / 'photo.png'}", "--iterations=2", "-v", "0"]),
  ]:
    out = tmp_path / f"{command}.png"
    result = muse_jax(
      command, f"--checkpoint={run}", "--prompt=a red circle", f"--out={out}", *extra
    )
    assert result.returncode == 0, f"{command}: {result.stderr}"
    assert out.is_file()
    # -v 0 (edit) brings the INFO logs back; the others stay quiet.
    assert bool(re.search(r"^I\d{4} ", result.stderr, re.M)) == (command == "edit"), command


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--checkpoint={tmp}/nothing", "--prompt=a", "--out={tmp}/o.png"], "no run folder at"),
        (["sample", "--checkpoint={run}", "--out={tmp}/o.png"], "--prompt is required"),
        (["sample", "--checkpoint={run}", "--prompt=a", "--out={tmp}/o.png", "--num-images=0"], "--num-images must be >= 1"),
        (["sample", "--checkpoint={run}", "--prompt=a", "--prompt=b", "--negative-prompt=x", "--negative-prompt=y",
          "--negative-prompt=z", "--out={tmp}/o.png"], "3 --negative-prompt flags for 2 --prompt flags"),
        (["inpaint", "--checkpoint={run}", "--prompt=a", "--image={photo}/photo.png", "--mask={photo}/notes.txt",
          "--out={tmp}/o.png"], "notes.txt is not a readable image"),
        (["inpaint", "--checkpoint={run}", "--prompt=a", "--image={photo}/photo.png",
          "--mask={photo}/empty_mask.png", "--out={tmp}/o.png"], "has no white pixels"),
        (["inpaint", "--checkpoint={run}", "--prompt=a", "--image={photo}/photo.png",
          "--mask={photo}/narrow_mask.png", "--out={tmp}/o.png"],
         "narrow_mask.png is 32x40 pixels but the image"),
        (["outpaint", "--checkpoint={run}", "--prompt=a", "--image={photo}/missing.png", "--out={tmp}/o.png"],
         "no image at"),
        (["edit", "--checkpoint={run}", "--prompt=a", "--prompt=b", "--image={photo}/photo.png",
          "--out={tmp}/o.png"], "takes one --prompt; got 2"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_of_error(run, photo, tmp_path, args, message):
  result = muse_jax(*[a.format(run=run, photo=photo, tmp=tmp_path) for a in args])
  assert result.returncode != 0
  assert message in result.stderr, result.stderr
  assert "Traceback" not in result.stderr


def test_missing_run_part_is_named(run, tmp_path):
  broken = tmp_path / "broken"
  broken.mkdir()
  for part in ("tokenizer", "text_encoder", "pipeline.json"):
    os.symlink(run / part, broken / part)
  result = muse_jax("sample", f"--checkpoint={broken}", "--prompt=a", f"--out={tmp_path / 'o.png'}")
  assert result.returncode != 0
  assert "the base part is missing" in result.stderr and "Traceback" not in result.stderr
