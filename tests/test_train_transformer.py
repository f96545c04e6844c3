"""The transformer trainer: sharded == single device, kill + resume == uninterrupted,
a tiny model overfits a fixed batch, a NaN stops the run and keeps the last good state.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import checkpointing, losses, masking
from muse_jax.trainers import token_batches
from muse_jax.trainers import transformer as trainer

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
STEPS = 6


def load_config(name: str, arg: str | None = "tiny"):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(**mesh):
  c = load_config("muse_base_632m")
  c.train.update(steps=STEPS, batch_size=8, ckpt_every=2, log_every=2, keep=5)
  c.mesh.update(mesh)
  return c


def final_params(workdir):
  with checkpointing.Checkpointer(workdir / "checkpoints") as ckpt:
    step = ckpt.latest_step()
    tree = ckpt.saved_tree(step)
    got = ckpt.restore_or_none({"params": tree["params"]}, partial=True)
  return got.step, got.state["params"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  """STEPS steps on a (fsdp=2, tensor=4) mesh of the 8 fake devices."""
  workdir = tmp_path_factory.mktemp("sharded")
  trainer.train_and_evaluate(tiny_config(shape={"data": 1, "fsdp": 2, "tensor": 4}), workdir)
  return workdir


def test_sharded_equals_single_device(sharded_run, tmp_path):
  single = tmp_path / "single"
  state = trainer.train_and_evaluate(
    tiny_config(shape={"data": 1, "fsdp": 1, "tensor": 1}, num_devices=1), single
  )
  assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == 1
  step_a, a = final_params(sharded_run)
  step_b, b = final_params(single)
  assert step_a == step_b == STEPS
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), a, b)
  # And training moved the parameters: the comparison is not of two initialisations.
  with checkpointing.Checkpointer(single / "checkpoints") as ckpt:
    first = ckpt.restore_or_none({"params": ckpt.saved_tree(2)["params"]}, step=2, partial=True)
  moved = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), first.state["params"], b)
  assert max(jax.tree.leaves(moved)) > 1e-3


class _Killed(Exception):
  pass


def test_kill_and_resume_equals_uninterrupted(sharded_run, tmp_path, monkeypatch):
  config = tiny_config(shape={"data": 1, "fsdp": 2, "tensor": 4})
  make_batches = token_batches.make_batches

  def dies_at_step_5(*args, **kwargs):
    data = make_batches(*args, **kwargs)
    real_next = data.__next__

    class Dying(type(data)):
      def __next__(self):
        if self.index == 4:  # Fetching the batch of step 5: the job is killed.
          raise _Killed()
        return real_next()

    data.__class__ = Dying
    return data

  monkeypatch.setattr(token_batches, "make_batches", dies_at_step_5)
  with pytest.raises(_Killed):
    trainer.train_and_evaluate(config, tmp_path)
  assert checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step() == 4
  monkeypatch.setattr(token_batches, "make_batches", make_batches)
  trainer.train_and_evaluate(config, tmp_path)  # resumes at 4, runs 5 and 6
  _, resumed = final_params(tmp_path)
  _, uninterrupted = final_params(sharded_run)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), resumed, uninterrupted
  )


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_config(shape={"data": 1, "fsdp": 2, "tensor": 4})
  make_batches = token_batches.make_batches

  def poisoned(*args, **kwargs):
    data = make_batches(*args, **kwargs)
    real_next = data.__next__

    class Poisoned(type(data)):
      def __next__(self):
        batch = real_next()
        if self.index == 3:  # The batch of step 3 carries a NaN.
          batch["text_emb"] = np.full_like(batch["text_emb"], np.nan)
        return batch

    data.__class__ = Poisoned
    return data

  monkeypatch.setattr(token_batches, "make_batches", poisoned)
  with pytest.raises(FloatingPointError, match=r"last good checkpoint is step 2"):
    trainer.train_and_evaluate(config, tmp_path)
  step, params = final_params(tmp_path)
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_superres_overfits_a_fixed_batch(tmp_path):
  c = load_config("muse_superres_512")
  c.train.update(steps=60, batch_size=8, ckpt_every=60, log_every=60, cond_drop_prob=0.0)
  c.data.update(fixed_batch=True)
  c.optim.update(lr=1e-2, warmup_steps=5)
  model = trainer.make_model(c.model)
  batch = next(token_batches.make_batches(c, local_batch=8, superres=True))
  mask = masking.arccos_mask(jax.random.key(7), 8, model.length)

  @jax.jit
  def masked_loss(params):
    inputs = jnp.where(mask, model.mask_id, batch["ids"])
    logits = model.apply(
      {"params": params}, inputs, batch["text_emb"], batch["text_mask"], batch["low_res_ids"]
    )
    return losses.masked_cross_entropy(logits, batch["ids"], mask)

  first = jax.tree.map(np.asarray, trainer.init_state(c, model, *_tx_and_shardings(c)).params)
  loss_before, _ = masked_loss(first)
  state = trainer.train_and_evaluate(c, tmp_path)
  loss_after, accuracy = masked_loss(jax.tree.map(np.asarray, state.params))
  assert float(loss_before) > 3.0  # about ln(64) at init
  assert float(loss_after) < 0.3 * float(loss_before), (float(loss_before), float(loss_after))
  assert float(accuracy) > 0.6


def _tx_and_shardings(c):
  from muse_jax import optim

  tx, _ = optim.make_optimizer(c.optim, c.train.steps)
  mesh, rules = trainer.mesh_and_rules(c)
  with jax.set_mesh(mesh):
    _, shardings = trainer.state_shardings(c, tx, mesh, rules)
  return tx, shardings
