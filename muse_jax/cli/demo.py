"""Masked parallel decoding, end to end, on a toy model that needs no training.

The "model" is a Potts field over a grid of colour tokens: each token's logits count
its already-revealed neighbours of each colour (so regions grow coherently), plus, in
the conditional rows, a bias toward the prompt's colour. The real decode loop
(`muse_jax.sampling.decode`, one compiled XLA program) samples it with classifier-free
guidance. Writes DIR/decode.png: one row per prompt, one column per decoding step.

  muse-jax demo --workdir /tmp/demo
  muse-jax demo --workdir /tmp/demo --config=configs/demo.py:tiny --config.sampler.num_steps=8
"""

import pathlib
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from PIL import Image

from muse_jax import sampling

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Folder for the demo's outputs (created if missing)."
)
_CONFIG = config_flags.DEFINE_config_file(
  "config", str(pathlib.Path(__file__).parents[2] / "configs" / "demo.py"), "Demo config file."
)

PALETTE = {  # The synthetic shapes set's colours (issue 6 convention).
  "red": (255, 0, 0),
  "green": (0, 170, 0),
  "blue": (0, 0, 255),
  "yellow": (255, 220, 0),
  "purple": (150, 0, 200),
  "orange": (255, 128, 0),
}
MASK_RGB = (230, 230, 230)


def potts_logits_fn(prefs: jax.Array, grid: int, coupling: float = 1.5, prompt_bias: float = 0.6):
  """Closure over per-row preferences [B', K] -> logits_fn(ids [B', L]) -> [B', L, K]."""
  num_colours = prefs.shape[-1]

  def logits_fn(ids):
    onehot = jax.nn.one_hot(ids, num_colours).reshape(-1, grid, grid, num_colours)  # mask -> 0
    padded = jnp.pad(onehot, ((0, 0), (1, 1), (1, 1), (0, 0)))
    neighbours = sum(
      padded[:, 1 + dy : 1 + dy + grid, 1 + dx : 1 + dx + grid]
      for dy in (-1, 0, 1)
      for dx in (-1, 0, 1)
      if (dy, dx) != (0, 0)
    )  # [B', g, g, K] counts of revealed neighbours per colour
    logits = coupling * neighbours + prompt_bias * prefs[:, None, None, :]
    return logits.reshape(ids.shape[0], grid * grid, num_colours)

  return logits_fn


def render(ids: np.ndarray, grid: int, scale: int) -> np.ndarray:
  """ids [L] (mask id = len(PALETTE)) -> uint8 [g·s, g·s, 3]."""
  colours = np.array([*PALETTE.values(), MASK_RGB], np.uint8)
  return np.kron(colours[ids.reshape(grid, grid)], np.ones((scale, scale, 1), np.uint8))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  unknown = [p for p in config.prompts if p not in PALETTE]
  if unknown:
    raise app.UsageError(f"prompts {unknown} are not colours; expected some of {list(PALETTE)}")
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)

  names = list(PALETTE)
  batch, grid, mask_id = len(config.prompts), config.grid, len(PALETTE)
  cond = jax.nn.one_hot(jnp.array([names.index(p) for p in config.prompts]), len(PALETTE))
  prefs = jnp.concatenate([cond, jnp.zeros_like(cond)])  # [conditional; unconditional]
  s = config.sampler
  decode = jax.jit(
    lambda ids, key: sampling.decode(
      ids,
      potts_logits_fn(prefs, grid),
      key,
      mask_id=mask_id,
      num_steps=s.num_steps,
      schedule=s.schedule,
      temperature=s.temperature,
      choice_temperature=s.choice_temperature,
      top_k=s.top_k or None,
      guidance_scale=s.guidance_scale,
      guidance_schedule=s.guidance_schedule,
      return_history=True,
    )
  )
  init = jnp.full((batch, grid * grid), mask_id, jnp.int32)
  start = time.perf_counter()
  out = jax.block_until_ready(decode(init, jax.random.key(config.seed)))
  compiled = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(decode(init, jax.random.key(config.seed + 1)))
  run = time.perf_counter() - start

  history = np.asarray(out.history)  # [N, B, L]
  rows = [
    np.concatenate(
      [render(history[i, b], grid, config.pixels_per_token) for i in range(s.num_steps)], 1
    )
    for b in range(batch)
  ]
  Image.fromarray(np.concatenate(rows, 0)).save(workdir / "decode.png")

  final = np.asarray(out.ids)
  print(
    f"decoded {batch} images of {grid}x{grid} tokens in {s.num_steps} steps, guidance {s.guidance_scale}"
  )
  print(f"first call (compile + run) {compiled:.2f} s; second call {run * 1e3:.1f} ms")
  for b, prompt in enumerate(config.prompts):
    share = np.mean(final[b] == names.index(prompt))
    print(f"  prompt {prompt!r:10} {share:6.1%} of tokens are {prompt}")
  print(f"wrote {workdir / 'decode.png'} (rows: prompts; columns: steps)")
