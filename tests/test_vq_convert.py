"""diffusers VQModel -> our VQGAN: golden parity, aMUSEd-256 layout, errors that name both sides."""

import json
import shutil

import jax
import numpy as np
import pytest

from muse_jax.convert import diffusers_vq
from muse_jax.convert.diffusers_vq import load_diffusers_vq, torch_name, vqgan_kwargs_from_config
from muse_jax.models.vqgan import VQGAN


@pytest.mark.parametrize("name", ["amused_tiny", "attn_tiny"])
def test_golden_parity(fixtures_dir, name):
  folder = fixtures_dir / "vq" / name
  model, params = load_diffusers_vq(folder)
  g = np.load(folder / "golden.npz")
  v = {"params": params}
  latents = model.apply(v, g["images"], method=model.encode_latents)
  np.testing.assert_allclose(latents, g["latents"], atol=1e-4)
  ids = jax.jit(lambda x: model.apply(v, x, method=model.encode))(g["images"])
  np.testing.assert_array_equal(ids, g["ids"])
  decoded = jax.jit(lambda i: model.apply(v, i, method=model.decode))(g["ids"])
  np.testing.assert_allclose(decoded, g["decoded"], atol=1e-4)
  recon, _ = model.apply(v, g["images"])
  np.testing.assert_allclose(recon, g["recon"], atol=1e-4)
  assert model.input_range == (0.0, 1.0)


def test_amused_256_layout_matches_every_tensor(fixtures_dir):
  """The real aMUSEd VQ: every one of its 277 tensors has a place of the right shape."""
  ref = json.loads((fixtures_dir / "vq" / "amused_256.json").read_text())
  kwargs = vqgan_kwargs_from_config(ref["config"])
  assert kwargs["channels"] == (128, 256, 256, 512, 768) and kwargs["decoder_num_res_blocks"] == 3
  assert (
    not kwargs["mid_attention"] and kwargs["codebook_size"] == 8192 and kwargs["embed_dim"] == 64
  )
  model = VQGAN(**kwargs)
  assert model.downsample_factor == 16
  abstract = diffusers_vq.abstract_params(model)
  tensors = {k: np.zeros(s, np.float32) for k, s in ref["shapes"].items()}
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  names = {torch_name(tuple(p.key for p in path)) for path, _ in flat}
  assert names == set(tensors)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == 146_244_675
  # Conversion itself (zeros; cheap): shapes line up in both directions.
  params = diffusers_vq.convert_params(tensors, abstract, source="amused-256")
  assert params["quantize"]["embedding"].shape == (8192, 64)


def test_torch_names():
  assert (
    torch_name(("encoder", "down_blocks_0_resnets_1", "conv1", "kernel"))
    == "encoder.down_blocks.0.resnets.1.conv1.weight"
  )
  assert (
    torch_name(("decoder", "up_blocks_2_upsamplers_0", "conv", "bias"))
    == "decoder.up_blocks.2.upsamplers.0.conv.bias"
  )
  assert (
    torch_name(("encoder", "mid_block", "attentions_0", "to_out_0", "kernel"))
    == "encoder.mid_block.attentions.0.to_out.0.weight"
  )
  assert torch_name(("encoder", "conv_norm_out", "scale")) == "encoder.conv_norm_out.weight"
  assert torch_name(("quantize", "embedding")) == "quantize.embedding.weight"


def _copy(fixtures_dir, tmp_path, edit):
  dst = tmp_path / "vq"
  shutil.copytree(fixtures_dir / "vq" / "amused_tiny", dst)
  cfg = json.loads((dst / "config.json").read_text())
  edit(cfg)
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def test_codebook_size_mismatch_names_both_sizes_and_files(fixtures_dir, tmp_path):
  dst = _copy(fixtures_dir, tmp_path, lambda c: c.update(num_vq_embeddings=128))
  with pytest.raises(
    ValueError,
    match=r"config.json says num_vq_embeddings=128.*diffusion_pytorch_model.safetensors holds .*\(64, 8\)",
  ):
    load_diffusers_vq(dst)


def test_expected_values_mismatch_names_both(fixtures_dir):
  with pytest.raises(
    ValueError,
    match=r"codebook_size mismatch: configs/x.py expects 8192 but .*config.json .* has 64",
  ):
    load_diffusers_vq(
      fixtures_dir / "vq" / "amused_tiny",
      expect={"codebook_size": 8192},
      expect_source="configs/x.py",
    )


def test_channel_mismatch_names_tensor_and_shapes(fixtures_dir, tmp_path):
  dst = _copy(fixtures_dir, tmp_path, lambda c: c.update(block_out_channels=[32, 128]))
  with pytest.raises(
    ValueError,
    match=r"safetensors \(config .*config.json\): tensor '.*' has shape \(64,\).* expects \(128,\)",
  ):
    load_diffusers_vq(dst)


def test_unsupported_options(fixtures_dir, tmp_path):
  dst = _copy(fixtures_dir, tmp_path, lambda c: c.update(norm_type="spatial"))
  with pytest.raises(ValueError, match=r"norm_type is 'spatial'; only 'group'"):
    load_diffusers_vq(dst)
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_diffusers_vq(tmp_path / "nowhere")
