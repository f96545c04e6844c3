"""The demo's settings: `muse-jax demo --workdir DIR [--config=configs/demo.py:tiny]`.

Every knob is overridable, e.g. `--config.sampler.num_steps=8 --config.sampler.guidance_scale=0`.
"""

import ml_collections


def sampler_config() -> ml_collections.ConfigDict:
  """Decode-loop settings with the paper's defaults for the base model (§2.8, §4)."""
  return ml_collections.ConfigDict(
    dict(
      num_steps=24,
      schedule="cosine",
      temperature=1.0,
      choice_temperature=4.5,
      top_k=0,  # 0: off.
      guidance_scale=3.0,
      guidance_schedule="linear",
    )
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.grid = 16  # tokens per side: the base model's 16x16.
  config.pixels_per_token = 8
  config.prompts = ["red", "green", "blue", "yellow", "purple", "orange"]
  config.sampler = sampler_config()
  if arg == "tiny":
    config.grid = 8
    config.prompts = ["red", "blue"]
    config.sampler.num_steps = 4
  elif arg not in (None, ""):
    raise ValueError(f"configs/demo.py: unknown variant {arg!r}; expected '' or 'tiny'")
  return config
