"""Optimizers, learning-rate schedules and gradient accumulation.

Muse trains its transformers with Adafactor (Shazeer & Stern 2018; paper Table 6):
β1 = 0.9, β2 = 0.96, weight decay 0.045, learning rate 1e-4 with 5k linear warmup
steps and cosine decay. The paper gives β2 as a plain decay rate (like Adam's), not
Adafactor's step-dependent ``1 - t^-0.8``, so ``scale_by_factored_rms`` here keeps an
exponential moving average with a constant β2 and Adam's bias correction, folded
into an effective per-step rate ``β2 (1 - β2^(t-1)) / (1 - β2^t)`` (exactly the
bias-corrected average; the first step uses ``g²`` itself). Further choices the paper
leaves open, all overridable in the config:

* updates are clipped to RMS 1 per tensor (Adafactor's update clipping) and the
  gradient to a global norm (``grad_clip_norm``);
* momentum is an exponential average of the updates (Adafactor's β1, no debiasing);
* weight decay is decoupled and scaled by the learning rate (AdamW style), applied
  to matrices only (ndim >= 2: kernels and embeddings, not biases or norm scales);
* no scaling of updates by the parameter's RMS (the paper's lr 1e-4 is Adam-like).

Besides Adafactor and AdamW, ``name="muon"`` trains the hidden weight matrices with Muon
(Jordan et al. 2024; ``optax.contrib.muon``): the momentum of each matrix is replaced by
its nearest semi-orthogonal matrix (Newton-Schulz iterations), so that every direction of
the matrix learns at the same rate, and rescaled to AdamW's update RMS (Liu et al. 2025,
"Muon is scalable", ``consistent_rms`` 0.2), so AdamW's learning rate and weight decay
carry over. Which axes of a parameter form the matrix comes from its logical axis names
(``muon_dimensions``); embeddings, output heads, position tables, biases and norm scales
stay with AdamW (with Nesterov momentum and no weight decay, as ``optax.contrib.muon``
builds its AdamW part). On the demo's base it reaches a lower loss in fewer steps than AdamW
(docs/demo.md).

Factored second moments are stored with ``keepdims`` ([R, 1] and [1, C] for an
[R, C] kernel), so every optimizer-state leaf has its parameter's rank and its
sharding follows from the parameter's (see ``opt_state_shardings``).

Gradient accumulation is a ``lax.scan`` over micro-batches inside one train step
(``accumulate_gradients``) rather than ``optax.MultiSteps``: MultiSteps keeps a
parameter-sized accumulator in the optimizer state for the whole run (3B params =
12 GB of fp32 in every checkpoint) and applies an update only every k-th call,
which muddles step counting, logging and checkpoint intervals. The scan needs the
accumulator only inside the step, and one call is always one optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax
from optax.contrib import MuonDimensionNumbers

from muse_jax.partitioning import CONV_IN, HEAD_DIM, HEADS, LAYERS, LENGTH, NORM, REL_POS, VOCAB

Schedule = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------
# Schedules.


def warmup_cosine(
  peak: float,
  total_steps: int,
  warmup_steps: int = 0,
  *,
  end_factor: float = 0.0,
  schedule: str = "cosine",
) -> Schedule:
  """Linear warmup from 0 to ``peak``, then cosine decay (or constant) to the end.

  Args:
    peak: the learning rate reached after warmup.
    total_steps: steps of the whole run, warmup included.
    warmup_steps: linear warmup length.
    end_factor: the final learning rate as a fraction of ``peak`` (cosine only).
    schedule: "cosine" or "constant" (after warmup).

  Returns:
    A function of the step (int array) giving the learning rate.
  """
  if total_steps < 1 or warmup_steps < 0:
    raise ValueError(
      f"need total_steps >= 1 and warmup_steps >= 0; got {total_steps}, {warmup_steps}"
    )
  warmup_steps = min(warmup_steps, total_steps)
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=peak * end_factor,
    )
  if schedule == "constant":
    warm = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup_steps])
  raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected 'cosine' or 'constant'")


# ---------------------------------------------------------------------------
# Adafactor with a constant, bias-corrected β2.


class FactoredRmsState(NamedTuple):
  count: jax.Array  # int32 []: updates applied so far.
  v_row: Any  # per leaf: [..., R, 1] row statistics of factored leaves, else [1,...,1].
  v_col: Any  # per leaf: [..., 1, C] column statistics of factored leaves, else [1,...,1].
  v: Any  # per leaf: full second moment of unfactored leaves, else [1,...,1].


def _factored_dims(shape: tuple[int, ...], min_dim: int) -> tuple[int, int] | None:
  """The two largest dims ``(row, col)``, in axis order, or None if not worth factoring."""
  if len(shape) < 2:
    return None
  largest = sorted(range(len(shape)), key=lambda d: (shape[d], d))[-2:]
  row, col = sorted(largest)
  if min(shape[row], shape[col]) < min_dim:
    return None
  return row, col


def scale_by_factored_rms(
  beta2: float = 0.96, eps: float = 1e-30, min_dim_size_to_factor: int = 128
) -> optax.GradientTransformation:
  """Divides by the (factored) RMS of past gradients: Adafactor's second moment.

  For a tensor whose two largest dims (R, C) are >= ``min_dim_size_to_factor``,
  the second moment is approximated by the outer product of its row and column
  means (``v ≈ r cᵀ / mean(r)``), O(R + C) memory instead of O(R C).

  Args:
    beta2: decay rate of the moving averages (bias-corrected).
    eps: added to squared gradients.
    min_dim_size_to_factor: smaller tensors keep a full second moment.
  """
  if not 0.0 <= beta2 < 1.0:
    raise ValueError(f"beta2 must be in [0, 1); got {beta2}")

  def init_fn(params):
    def stats(p):
      ones = (1,) * p.ndim
      dims = _factored_dims(p.shape, min_dim_size_to_factor)
      if dims is None:
        return (
          jnp.zeros(ones, jnp.float32),
          jnp.zeros(ones, jnp.float32),
          jnp.zeros(p.shape, jnp.float32),
        )
      row, col = dims
      v_row = jnp.zeros(tuple(1 if d == col else n for d, n in enumerate(p.shape)), jnp.float32)
      v_col = jnp.zeros(tuple(1 if d == row else n for d, n in enumerate(p.shape)), jnp.float32)
      return v_row, v_col, jnp.zeros(ones, jnp.float32)

    leaves = jax.tree.map(stats, params)
    pick = lambda i: jax.tree.map(lambda p, s: s[i], params, leaves)
    return FactoredRmsState(jnp.zeros([], jnp.int32), pick(0), pick(1), pick(2))

  def update_fn(updates, state, params=None):
    del params
    t = (state.count + 1).astype(jnp.float32)
    # Bias-corrected EMA as an EMA with a per-step rate (0 on the first step).
    rate = beta2 * (1.0 - beta2 ** (t - 1.0)) / (1.0 - beta2**t)

    def one(g, v_row, v_col, v):
      g32 = g.astype(jnp.float32)
      g2 = jnp.square(g32) + eps
      dims = _factored_dims(g.shape, min_dim_size_to_factor)
      if dims is None:
        v = rate * v + (1.0 - rate) * g2
        return (g32 * jax.lax.rsqrt(v)).astype(g.dtype), v_row, v_col, v
      row, col = dims
      v_row = rate * v_row + (1.0 - rate) * jnp.mean(g2, axis=col, keepdims=True)
      v_col = rate * v_col + (1.0 - rate) * jnp.mean(g2, axis=row, keepdims=True)
      row_mean = jnp.mean(v_row, axis=row, keepdims=True)
      update = g32 * jax.lax.rsqrt(v_row / row_mean) * jax.lax.rsqrt(v_col)
      return update.astype(g.dtype), v_row, v_col, v

    out = jax.tree.map(one, updates, state.v_row, state.v_col, state.v)
    treedef = jax.tree.structure(updates)
    parts = [
      jax.tree.unflatten(treedef, [leaf[i] for leaf in treedef.flatten_up_to(out)])
      for i in range(4)
    ]
    return parts[0], FactoredRmsState(state.count + 1, parts[1], parts[2], parts[3])

  return optax.GradientTransformation(init_fn, update_fn)


def _matrices(params: Any) -> Any:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adafactor(
  learning_rate: float | Schedule,
  *,
  beta1: float | None = 0.9,
  beta2: float = 0.96,
  weight_decay: float = 0.045,
  clip_threshold: float | None = 1.0,
  eps: float = 1e-30,
  min_dim_size_to_factor: int = 128,
  momentum_dtype: Any = jnp.float32,
) -> optax.GradientTransformation:
  """Adafactor as Muse trains with it (see the module docstring for the choices)."""
  parts = [scale_by_factored_rms(beta2, eps, min_dim_size_to_factor)]
  if clip_threshold is not None:
    parts.append(optax.clip_by_block_rms(clip_threshold))
  if beta1 is not None:
    parts.append(optax.ema(beta1, debias=False, accumulator_dtype=momentum_dtype))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=_matrices))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


# ---------------------------------------------------------------------------
# Muon for the hidden weight matrices.

# Axes that make a parameter a table rather than a map between hidden widths: Muon's
# equal-rate updates suit the latter (Jordan et al.; Liu et al. keep embeddings and the
# output head on AdamW).
_NOT_MUON = frozenset({VOCAB, LENGTH, REL_POS, NORM})


def muon_dimensions(axes: tuple[str | None, ...]) -> MuonDimensionNumbers | None:
  """Which axes of a parameter Muon treats as the matrix's inputs and outputs, or None.

  From the parameter's logical axis names (one per dim):
  - convolution kernels (``CONV_IN`` present, layout HWIO): inputs H, W, I; output O;
  - attention output projections ``(HEADS, HEAD_DIM, EMBED)``: inputs HEADS and HEAD_DIM;
  - other kernels (``(EMBED, MLP)``, ``(EMBED, HEADS, HEAD_DIM)``, ...): the first axis in;
  - ``LAYERS`` (stacked layers of ``nn.scan``) is a batch axis: each layer on its own;
  - None (AdamW) for vectors, tables (``_NOT_MUON``) and kernels with unnamed axes other
    than a convolution's (the depthwise convolution, relative position biases).
  """
  axes = tuple(axes)
  dims = [i for i, name in enumerate(axes) if name != LAYERS]
  if len(dims) < 2 or _NOT_MUON & set(axes):
    return None
  if CONV_IN in axes:
    return MuonDimensionNumbers(tuple(dims[:-1]), (dims[-1],))
  if None in axes:
    return None
  inputs = [i for i in dims if axes[i] in (HEADS, HEAD_DIM)] if axes[dims[0]] == HEADS else dims[:1]
  return MuonDimensionNumbers(tuple(inputs), tuple(i for i in dims if i not in inputs))


def make_optimizer(
  config: Any, total_steps: int, logical_axes: Any = None
) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimizer an ``optim`` config section describes.

  Args:
    config: fields ``name`` ("adafactor", "adamw", "adam" or "muon"), ``lr``,
      ``warmup_steps``, ``schedule`` ("cosine"/"constant"), ``end_lr_factor``,
      ``b1``, ``b2``, ``weight_decay``, ``grad_clip_norm`` (0 or None: off),
      ``eps`` and, optionally, ``momentum_dtype`` ("float32"/"bfloat16"). For
      "muon": ``b1`` and ``b2`` are the AdamW part's, weight decay applies to the
      Muon matrices only, and ``muon_beta`` (default 0.95) is Muon's momentum.
    total_steps: length of the run, for the schedule.
    logical_axes: for "muon" only: the parameters' logical axis names, a tree like the
      parameters of tuples (``nn.get_partition_spec`` of the boxed ``eval_shape``).

  Returns:
    ``(tx, schedule)``; ``schedule(step)`` is the learning rate, for logging.
  """
  schedule = warmup_cosine(
    config.lr,
    total_steps,
    config.warmup_steps,
    end_factor=config.get("end_lr_factor", 0.0),
    schedule=config.get("schedule", "cosine"),
  )
  momentum_dtype = jnp.dtype(config.get("momentum_dtype", "float32"))
  name = config.name
  if name == "adafactor":
    tx = adafactor(
      schedule,
      beta1=config.b1,
      beta2=config.b2,
      weight_decay=config.weight_decay,
      clip_threshold=config.get("clip_threshold", 1.0),
      eps=config.get("eps", 1e-30),
      momentum_dtype=momentum_dtype,
    )
  elif name in ("adamw", "adam"):
    tx = optax.adamw(
      schedule,
      b1=config.b1,
      b2=config.b2,
      eps=config.get("eps", 1e-8),
      weight_decay=config.weight_decay if name == "adamw" else 0.0,
      mu_dtype=momentum_dtype,
      mask=_matrices,
    )
  elif name == "muon":
    if logical_axes is None:
      raise ValueError(
        "optim.name='muon' needs the parameters' logical axis names (logical_axes); got none. "
        "Pass them, or use 'adafactor', 'adamw' or 'adam'"
      )
    dimensions = jax.tree.map(
      lambda spec: muon_dimensions(tuple(spec)), logical_axes, is_leaf=_is_spec
    )
    tx = optax.contrib.muon(
      schedule,
      beta=config.get("muon_beta", 0.95),
      weight_decay=config.weight_decay,
      mu_dtype=momentum_dtype,
      adam_b1=config.b1,
      adam_b2=config.b2,
      muon_weight_dimension_numbers=dimensions,
      consistent_rms=0.2,  # AdamW's update RMS, so that its lr and weight decay carry over
    )
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected 'adafactor', 'adamw', 'adam' or 'muon'")
  clip = config.get("grad_clip_norm", None)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule


def _is_spec(x: Any) -> bool:
  return isinstance(x, (tuple, P))


# ---------------------------------------------------------------------------
# Sharding of optimizer state.


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any) -> Any:
  """Shardings for an optimizer state, derived from the parameters' shardings.

  Every subtree of the optimizer state shaped like the parameter tree (Adam's mu
  and nu, Adafactor's statistics, momentum) gets, leaf by leaf, the sharding of
  its parameter, with the mesh axes of size-1 (reduced) dims dropped. A subtree of a
  partitioned optimizer (Muon's, ``optax.partition``) holds ``optax.MaskedNode``s in
  place of the other part's parameters; they stay as they are. Everything else (step
  counts) is replicated.

  Args:
    abstract_opt_state: ``jax.eval_shape(tx.init, params)``.
    param_shardings: ``NamedSharding`` per parameter (same tree as the params).
  """
  param_def = jax.tree.structure(param_shardings)
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  replicated = NamedSharding(mesh, P())

  masked = lambda x: isinstance(x, optax.MaskedNode)

  def like_params(node: Any) -> bool:
    return not hasattr(node, "shape") and jax.tree.structure(node, is_leaf=masked) == param_def

  def leaf(x, sharding):
    if masked(x):
      return x
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    if len(spec) != x.ndim:
      return replicated
    return NamedSharding(
      mesh, P(*(s if n != 1 else None for s, n in zip(spec, x.shape, strict=True)))
    )

  def node(x):
    if like_params(x):
      return jax.tree.map(leaf, x, param_shardings, is_leaf=masked)
    return replicated

  return jax.tree.map(
    node, abstract_opt_state, is_leaf=lambda x: like_params(x) or hasattr(x, "shape")
  )


# ---------------------------------------------------------------------------
# Gradient accumulation.


def accumulate_gradients(
  grad_fn: Callable[[Any, Any, jax.Array], tuple[tuple[jax.Array, Any], Any]],
  params: Any,
  batch: Any,
  rng: jax.Array,
  micro_steps: int,
) -> tuple[tuple[jax.Array, Any], Any]:
  """Mean loss, auxiliaries and gradients over ``micro_steps`` slices of the batch.

  Args:
    grad_fn: ``jax.value_and_grad(loss_fn, has_aux=True)`` of
      ``loss_fn(params, batch, rng) -> (loss, aux)``; aux is a pytree of scalars.
    params: the parameters.
    batch: pytree of arrays whose leading axis is the (per-step) batch.
    rng: PRNG key; each micro-batch gets its own fold.
    micro_steps: the number of slices (1: a plain call).

  Returns:
    ``((loss, aux), grads)``, averaged over micro-batches. Equal to one call on the
    whole batch when the loss is a mean over equally sized examples.
  """
  if micro_steps == 1:
    return grad_fn(params, batch, rng)
  size = jax.tree.leaves(batch)[0].shape[0]
  if size % micro_steps:
    raise ValueError(f"batch size {size} is not divisible into {micro_steps} micro-batches")
  # Strided micro-batches (rows m, m + k, m + 2k, ...): with the batch split over devices
  # in contiguous blocks, every device then holds its share of every micro-batch, so
  # slicing one out needs no communication (contiguous slices would idle most devices).
  micro = jax.tree.map(
    lambda x: jnp.swapaxes(x.reshape(size // micro_steps, micro_steps, *x.shape[1:]), 0, 1), batch
  )

  def body(carry, inputs):
    index, one_batch = inputs
    (loss, aux), grads = grad_fn(params, one_batch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, ((loss, aux), grads)), None

  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(micro_steps), micro))
  return jax.tree.map(lambda x: x / micro_steps, total)
