"""Encode / decode speed of the aMUSEd-size VQ at 256x256, ours vs diffusers' VQModel.

The model is aMUSEd's tokenizer layout (channels 128-256-256-512-768, 2 / 3 res blocks per
encoder / decoder resolution, latent 64, K = 8192, f = 16; 146M parameters) with random
weights; both sides get the *same* weights (ours are converted from the torch state dict
by ``muse_jax.convert.diffusers_vq``), and the outputs are compared. diffusers is timed
in the same process when torch and diffusers are importable, else only ours.

  python benchmarks/vq_speed.py                     # batch 1, fp32
  python benchmarks/vq_speed.py --batch 4 --repeats 3 --json /tmp/vq_speed.json
  python benchmarks/vq_speed.py --no_torch --conv_impl winograd --conv_dtype bfloat16

Times are medians over ``--repeats`` calls after one warm-up call (ours: after jit
compilation, whose time is reported separately). Throughput = images / second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from muse_jax.models.vq_convs import CONV_IMPLS

AMUSED_VQ = dict(
  block_out_channels=[128, 256, 256, 512, 768],
  layers_per_block=2,
  latent_channels=64,
  num_vq_embeddings=8192,
  norm_num_groups=32,
  mid_block_add_attention=False,
  lookup_from_codebook=True,
  sample_size=32,
)


def _median_time(fn, repeats: int) -> float:
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def torch_model(seed: int = 0):
  """diffusers' VQModel with aMUSEd's config and random weights, or None without torch."""
  try:
    from diffusers import VQModel
    import torch
  except ImportError:
    return None
  torch.manual_seed(seed)
  m = VQModel(
    down_block_types=["DownEncoderBlock2D"] * 5,
    up_block_types=["UpDecoderBlock2D"] * 5,
    act_fn="silu",
    **AMUSED_VQ,
  ).eval()
  with torch.no_grad():  # spread the codebook so that ids are diverse
    m.quantize.embedding.weight.normal_()
  return m


def ours_from_state_dict(
  state_dict: dict[str, np.ndarray] | None, dtype: str, conv_impl: str = "xla", conv_dtype=None
):
  import jax
  import jax.numpy as jnp

  from muse_jax.convert import diffusers_vq
  from muse_jax.models.vqgan import VQGAN

  kwargs = diffusers_vq.vqgan_kwargs_from_config(
    {
      **AMUSED_VQ,
      "down_block_types": ["DownEncoderBlock2D"] * 5,
      "up_block_types": ["UpDecoderBlock2D"] * 5,
    }
  )
  model = VQGAN(
    **kwargs,
    input_range=(0.0, 1.0),
    dtype=jnp.dtype(dtype),
    conv_impl=conv_impl,
    conv_dtype=conv_dtype and jnp.dtype(conv_dtype),
  )
  abstract = diffusers_vq.abstract_params(model)
  if state_dict is None:
    import flax.linen as nn

    params = nn.meta.unbox(
      jax.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3)))["params"])(jax.random.key(0))
    )
  else:
    params = diffusers_vq.convert_params(state_dict, abstract, source="torch VQModel")
  return model, params


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dtype", default="float32", help="our compute dtype (float32 or bfloat16)")
  ap.add_argument(
    "--conv_impl", choices=CONV_IMPLS, default="xla", help="our 3x3 convolutions (vq_convs)"
  )
  ap.add_argument("--conv_dtype", default=None, help="their products' dtype (default: --dtype)")
  ap.add_argument("--no_torch", action="store_true", help="time ours only")
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  tm = None if args.no_torch else torch_model()
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()} if tm is not None else None
  model, params = ours_from_state_dict(sd, args.dtype, args.conv_impl, args.conv_dtype)
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
  h = args.size // model.downsample_factor

  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
  decode = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.decode))
  x = jnp.asarray(images)
  t0 = time.perf_counter()
  ids = encode(params, x).block_until_ready()
  compile_encode = time.perf_counter() - t0
  t0 = time.perf_counter()
  decode(params, ids).block_until_ready()
  compile_decode = time.perf_counter() - t0
  ours_enc = _median_time(lambda: encode(params, x).block_until_ready(), args.repeats)
  ours_dec = _median_time(lambda: decode(params, ids).block_until_ready(), args.repeats)
  result = {
    "device": jax.devices()[0].device_kind,
    "cpu_threads": __import__("os").cpu_count(),
    "batch": args.batch,
    "size": args.size,
    "tokens": [h, h],
    "params_millions": round(sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params)) / 1e6, 2),
    "ours_dtype": args.dtype,
    "ours_convs": f"{args.conv_impl}, products in {args.conv_dtype or args.dtype}",
    "ours_first_call_s": {"encode": round(compile_encode, 2), "decode": round(compile_decode, 2)},
    "ours_s": {"encode": round(ours_enc, 3), "decode": round(ours_dec, 3)},
    "ours_images_per_s": {
      "encode": round(args.batch / ours_enc, 3),
      "decode": round(args.batch / ours_dec, 3),
    },
  }
  if tm is not None:
    import torch

    xt = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    idt = torch.from_numpy(np.array(ids)).long()
    shape = (args.batch, h, h, model.code_dim)
    with torch.no_grad():
      t_enc = lambda: tm.quantize(tm.encode(xt).latents)[2][2]
      t_dec = lambda: tm.decode(idt, force_not_quantize=True, shape=shape).sample
      ref_ids = t_enc().reshape(args.batch, h, h).numpy()
      ref_img = t_dec().permute(0, 2, 3, 1).numpy()
      torch_enc = _median_time(t_enc, args.repeats)
      torch_dec = _median_time(t_dec, args.repeats)
    ours_img = np.asarray(decode(params, ids))
    result.update(
      torch_threads=torch.get_num_threads(),
      diffusers_s={"encode": round(torch_enc, 3), "decode": round(torch_dec, 3)},
      diffusers_images_per_s={
        "encode": round(args.batch / torch_enc, 3),
        "decode": round(args.batch / torch_dec, 3),
      },
      speedup={"encode": round(torch_enc / ours_enc, 2), "decode": round(torch_dec / ours_dec, 2)},
      agreement={
        "ids_equal_fraction": float(np.mean(ref_ids == np.asarray(ids))),
        "decode_max_abs_diff": float(np.abs(ref_img - ours_img).max()),
      },
    )
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
