"""CLIP text transformer: parity with transformers, causality, pooling, argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import text_encoders
from muse_jax.convert.hf_text import load_params, module_from_config, open_text_checkpoint

# clip: CLIPTextModelWithProjection with the legacy eos_token_id (pooled at argmax(ids)).
# pipeline: CLIPTextModel, current eos_token_id (first end-of-text), padded with "!".
FOLDERS = {"clip": "clip", "pipeline": "pipeline/text_encoder"}


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def clip(request, fixtures_dir):
  checkpoint = open_text_checkpoint(fixtures_dir / "text" / FOLDERS[request.param])
  params = load_params(checkpoint)
  golden = dict(np.load(fixtures_dir / "text" / f"golden_{request.param}.npz"))

  @functools.partial(jax.jit, static_argnames="hidden_layer")
  def apply(params, ids, hidden_layer=-2):
    return checkpoint.module.apply({"params": params}, ids, hidden_layer=hidden_layer)

  return request.param, checkpoint, params, golden, apply


def test_matches_transformers(clip):
  name, checkpoint, params, golden, apply = clip
  assert (checkpoint.module.projection_dim is None) == (name == "pipeline")
  penultimate, last, pooled = apply(params, golden["input_ids"])
  tol = dict(atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(penultimate, golden["penultimate_hidden_state"], **tol)
  np.testing.assert_allclose(last, golden["last_hidden_state"], **tol)
  np.testing.assert_allclose(pooled, golden["pooled"], **tol)
  first, _, _ = apply(params, golden["input_ids"], hidden_layer=1)
  np.testing.assert_allclose(first, golden["first_hidden_state"], **tol)


def test_causal_states_ignore_what_follows_the_end_token(clip):
  _, _, params, golden, apply = clip
  ids = golden["input_ids"]
  real = golden["attention_mask"]
  scrambled = np.where(real, ids, (ids * 7 + 3) % 1000)  # other tokens after the end.
  a, _, pooled_a = apply(params, ids)
  b, _, pooled_b = apply(params, scrambled)
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)
  np.testing.assert_allclose(pooled_a, pooled_b, atol=1e-5)
  assert np.abs(np.asarray(a)[~real] - np.asarray(b)[~real]).max() > 1e-3


def test_pooled_is_the_projected_end_token_state(clip):
  name, checkpoint, params, golden, apply = clip
  _, last, pooled = apply(params, golden["input_ids"])
  eos = golden["attention_mask"].sum(1) - 1  # the end token closes the real tokens.
  state = np.asarray(last)[np.arange(len(eos)), eos]
  if checkpoint.module.projection_dim is not None:
    state = state @ np.asarray(params["projection"])
  np.testing.assert_allclose(pooled, state, atol=1e-5)


def test_rejects_bad_arguments(clip):
  _, checkpoint, params, golden, _ = clip
  layers = checkpoint.module.num_layers
  with pytest.raises(ValueError, match="hidden_layer=4 is out of range for 3 layers"):
    checkpoint.module.apply({"params": params}, golden["input_ids"][:1], hidden_layer=layers + 1)
  with pytest.raises(ValueError, match="78 tokens exceed the 77 positions"):
    checkpoint.module.apply({"params": params}, np.zeros((1, 78), np.int32))


def test_clip_l14_parameter_count():
  config = text_encoders.get_config("clip_l14")
  module = module_from_config(config.hf_config.to_dict())
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
  total = sum(x.size for x in jax.tree.leaves(shapes))
  # CLIPTextModelWithProjection of openai/clip-vit-large-patch14: 123.06M + 0.59M projection.
  d, f = 768, 3072
  per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
  assert total == 49408 * d + 77 * d + 12 * per_layer + 2 * d + d * d
