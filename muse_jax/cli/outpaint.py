"""Extends an image beyond its borders to match a prompt (paper §3.3).

The image (center-cropped and resized to the run's resolution) is shifted away from
the given directions by --size pixels and the new border is generated.

  muse-jax outpaint --checkpoint RUN --image photo.png --direction right --size 64 --prompt "a beach" --out out.png
"""

from absl import flags

from muse_jax.cli import common

flags.adopt_module_key_flags(common)
DIRECTION = flags.DEFINE_list(
  "direction", ["right"], "Where to extend: left, right, up, down (comma-separated)."
)
SIZE = flags.DEFINE_integer(
  "size", None, "Width of the new border in pixels (default: a quarter of the image)."
)


def main(argv):
  del argv

  def check():
    common.require(common.IMAGE, "the image to extend")
    common.single_prompt()
    common.read_image(common.IMAGE.value, None)

  def make(pipeline):
    prompt = common.single_prompt()
    image = common.read_image(common.IMAGE.value, pipeline.resolution)
    pictures = pipeline.outpaint(
      image,
      prompt,
      directions=DIRECTION.value,
      size=SIZE.value,
      negative_prompt=common.negative_prompts(1),
      num_images=common.NUM_IMAGES.value,
      seed=common.SEED.value,
      **common.sampler_overrides(),
    )
    return pictures, [prompt] * len(pictures)

  common.run("outpaint", make, check)
