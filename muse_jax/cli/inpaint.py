"""Regenerates the masked region of an image to match a prompt (paper §3.3).

The mask has the image's size and is white (or any value > 127) where to regenerate; both
are center-cropped and resized to the run's resolution. With a super-res stage the region is
inpainted on the low-res tokens first, then on the high-res tokens.

  muse-jax inpaint --checkpoint RUN --image photo.png --mask mask.png --prompt "a red circle" --out out.png
"""

from absl import flags

from muse_jax.cli import common

flags.adopt_module_key_flags(common)
MASK = flags.DEFINE_string("mask", None, "Mask image of --image's size: white = regenerate.")


def main(argv):
  del argv

  def check():
    common.require(common.IMAGE, "the image to edit")
    common.require(MASK, "the region to regenerate")
    common.single_prompt()
    image = common.read_image(common.IMAGE.value, None)
    mask = common.read_image(MASK.value, None, mask=True)
    # Both are cropped and resized to the run's resolution, each on its own: only masks of
    # the image's size stay over the pixels they mark.
    if mask.shape != image.shape[:2]:
      (mh, mw), (ih, iw) = mask.shape, image.shape[:2]
      raise common.CommandError(
        f"the mask {MASK.value} is {mw}x{mh} pixels but the image {common.IMAGE.value} is "
        f"{iw}x{ih}; expected a mask of the image's size"
      )
    if not mask.any():
      raise common.CommandError(f"the mask {MASK.value} has no white pixels: nothing to inpaint")

  def make(pipeline):
    prompt = common.single_prompt()
    image = common.read_image(common.IMAGE.value, pipeline.resolution)
    mask = common.read_image(MASK.value, pipeline.resolution, mask=True)
    pictures = pipeline.inpaint(
      image,
      mask,
      prompt,
      negative_prompt=common.negative_prompts(1),
      num_images=common.NUM_IMAGES.value,
      seed=common.SEED.value,
      **common.sampler_overrides(),
    )
    return pictures, [prompt] * len(pictures)

  common.run("inpaint", make, check)
