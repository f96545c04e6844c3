"""Mask-free editing (paper §3.3): re-samples an image's tokens toward a prompt.

Each iteration masks a random --fraction of the tokens and re-samples them with
guidance and top-k sampling; the paper uses 8%, 100 iterations, guidance 4, top-k 3.
An optional --region limits the change to its white region.

  muse-jax edit --checkpoint RUN --image photo.png --prompt "a blue circle" --out edited.png
"""

from absl import flags

from muse_jax.cli import common

flags.adopt_module_key_flags(common)
REGION = flags.DEFINE_string("region", None, "Optional mask image: white where tokens may change.")
ITERATIONS = flags.DEFINE_integer("iterations", 100, "Re-sampling iterations.")
FRACTION = flags.DEFINE_float("fraction", 0.08, "Fraction of the tokens re-sampled per iteration.")


def main(argv):
  del argv

  def check():
    common.require(common.IMAGE, "the image to edit")
    common.single_prompt()
    common.read_image(common.IMAGE.value, None)
    if REGION.value:
      common.read_image(REGION.value, None, mask=True)
    if ITERATIONS.value < 1:
      raise common.CommandError(f"--iterations must be >= 1; got {ITERATIONS.value}")

  def make(pipeline):
    prompt = common.single_prompt()
    image = common.read_image(common.IMAGE.value, pipeline.resolution)
    mask = common.read_image(REGION.value, pipeline.resolution, mask=True) if REGION.value else None
    options = common.sampler_overrides()
    pictures = pipeline.edit(
      image,
      prompt,
      negative_prompt=common.negative_prompts(1),
      num_images=common.NUM_IMAGES.value,
      seed=common.SEED.value,
      num_iterations=ITERATIONS.value,
      resample_fraction=FRACTION.value,
      top_k=options.get("top_k", 3),
      guidance_scale=options.get("guidance_scale", 4.0),
      temperature=options.get("temperature", 1.0),
      mask=mask,
    )
    return pictures, [prompt] * len(pictures)

  common.run("edit", make, check)
