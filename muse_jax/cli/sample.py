"""Generates images from text with a run's pipeline (base, then super-res if the run has one).

muse-jax sample --checkpoint /tmp/muse_demo --prompt "a red circle" --num-images 4 --out samples.png
muse-jax sample --checkpoint /tmp/muse_demo --prompt "a red circle" --prompt "two blue squares" --out two.png
muse-jax sample --checkpoint RUN --prompt "a cat" --negative-prompt "blurry" --guidance-scale 6 --out cat.png
"""

from absl import flags

from muse_jax.cli import common

flags.adopt_module_key_flags(common)


def main(argv):
  del argv

  def check():
    common.require(common.PROMPT, "the text to draw")
    if common.NUM_IMAGES.value < 1:
      raise common.CommandError(f"--num-images must be >= 1; got {common.NUM_IMAGES.value}")
    common.negative_prompts(len(common.PROMPT.value))

  def make(pipeline):
    prompts = common.PROMPT.value
    pictures = pipeline.generate(
      prompts,
      common.negative_prompts(len(prompts)),
      seed=common.SEED.value,
      num_images_per_prompt=common.NUM_IMAGES.value,
      superres_num_steps=common.SUPERRES_STEPS.value,
      **common.sampler_overrides(),
    )
    return pictures, [p for p in prompts for _ in range(common.NUM_IMAGES.value)]

  common.run("sample", make, check)
