"""Logical axis names, the rules that map them onto a device mesh, and sharded init.

Sharding is declared once: every parameter is created with logical axis names
(``nn.with_logical_partitioning(init, (EMBED, MLP))``) and activations are
constrained at block boundaries (``constrain(x, (BATCH, LENGTH, EMBED))``). A rule
table maps each logical name to a mesh axis (or to nothing, i.e. replicated), so
the same model runs data-parallel on one host, FSDP on a TPU pod, or with tensor
parallelism, by changing the rules and the mesh shape only.

The mesh has three named axes:

* ``data``: pure data parallelism (parameters replicated);
* ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3);
* ``tensor``: model (Megatron-style) parallelism over heads and MLP width.

The batch is split over ``data`` and ``fsdp`` together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

# ---------------------------------------------------------------------------
# Mesh axis names.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# ---------------------------------------------------------------------------
# Logical axis names, for parameters and activations. Use these constants, never
# the strings, so that a typo is a NameError instead of a silently replicated axis.
BATCH = "batch"  # B: examples.
LENGTH = "length"  # L: image-token positions (queries).
KV_LENGTH = "kv_length"  # keys/values of self-attention; never sharded.
TEXT_LENGTH = "text_length"  # T: text-token positions.
EMBED = "embed"  # D: model width.
TEXT_EMBED = "text_embed"  # Dt: width of the (frozen) text encoder's outputs.
MLP = "mlp"  # F: feed-forward hidden width.
HEADS = "heads"  # N: attention heads.
HEAD_DIM = "head_dim"  # H: per-head width.
VOCAB = "vocab"  # K: codebook size (+ special tokens) of output heads / embeddings.
LAYERS = "layers"  # the stacked-layer axis of nn.scan.
REL_POS = "rel_pos"  # relative-position buckets (T5).
CONV_IN = "conv_in"  # input channels of a convolution kernel.
CONV_OUT = "conv_out"  # output channels of a convolution kernel.
SPATIAL = "spatial"  # kernel height / width and image rows / columns.
NORM = "norm"  # scale / bias vectors of a normalisation layer.

Rules = tuple[tuple[str, Any], ...]

# FSDP over the model width and tensor parallelism over heads / MLP width. With a
# mesh of shape (data=n, fsdp=1, tensor=1) this degenerates to data parallelism.
DEFAULT_RULES: Rules = (
  (BATCH, (DATA, FSDP)),
  (LENGTH, None),
  (KV_LENGTH, None),
  (TEXT_LENGTH, None),
  (EMBED, FSDP),
  (TEXT_EMBED, FSDP),
  (MLP, TENSOR),
  (HEADS, TENSOR),
  (HEAD_DIM, None),
  (VOCAB, TENSOR),
  (LAYERS, None),
  (REL_POS, None),
  (CONV_IN, None),
  (CONV_OUT, FSDP),
  (SPATIAL, None),
  (NORM, None),
)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> Rules:
  """Turns config rules (lists, from a ConfigDict) into the tuple form flax wants.

  A mesh-axis entry may be a string, ``None`` or a list of strings.
  """
  if rules is None:
    return DEFAULT_RULES
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"each sharding rule must be (logical_name, mesh_axes); got {item!r}")
    name, axes = item
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [axes] if axes is not None and axes not in MESH_AXES else []
    if bad:
      raise ValueError(f"rule for {name!r} names mesh axes {bad}; expected some of {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def make_mesh(
  shape: Mapping[str, int] | Sequence[int] | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh with Auto axis types.

  Args:
    shape: sizes per mesh axis, as a mapping (missing axes are 1) or a 3-tuple. One
      size may be -1, meaning "all remaining devices". Default: all devices on
      ``data``.
    devices: the devices to use; default ``jax.devices()``.

  Returns:
    A ``Mesh`` whose axes are ``MESH_AXES``. Auto axis types matter: flax's logical
    partitioning does not work with the Explicit default of ``jax.make_mesh``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    sizes = [-1, 1, 1]
  elif isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh axes {sorted(unknown)} are unknown; expected some of {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh shape {tuple(sizes)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1; got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"{len(devices)} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; {len(devices)} are available"
    )
  if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
    # Let jax order devices for the physical topology (rings on TPU).
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def batch_spec(ndim: int) -> P:
  """PartitionSpec that splits the leading (batch) axis over data and fsdp."""
  return P((DATA, FSDP), *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places a host-local pytree of arrays with their batch axis over (data, fsdp)."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh/rules)."""
  return nn.with_logical_constraint(x, axes)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract values.

  Leaves without logical metadata are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def sharded_abstract(boxed_abstract: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """An ``eval_shape`` tree with axis names -> unboxed ``ShapeDtypeStruct``s that carry
  their shardings: the target to restore a checkpoint straight onto its devices."""
  shardings = logical_shardings(boxed_abstract, mesh, rules)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    unbox_abstract(boxed_abstract),
    shardings,
  )


def sharded_init(
  init_fn: Callable[..., Any],
  mesh: Mesh,
  rules: Rules = DEFAULT_RULES,
  *args: Any,
) -> tuple[Any, Any]:
  """Creates a pytree already sharded, never materialising it on one device.

  ``jax.eval_shape`` gives the abstract tree with its logical axis names, the rules
  turn those into shardings, and ``jax.jit(init_fn, out_shardings=...)`` creates
  each shard where it lives (big_vision / flax examples recipe).

  Args:
    init_fn: pure function of ``*args`` returning a pytree that may hold
      ``nn.LogicallyPartitioned`` boxes (e.g. ``model.init``).
    mesh: the device mesh.
    rules: logical-to-mesh rules.
    *args: arguments of ``init_fn`` (e.g. a PRNG key and dummy inputs).

  Returns:
    ``(tree, shardings)`` with boxes removed from both.
  """
  with nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    unboxed = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return unboxed, shardings


def unbox_abstract(tree: Any) -> Any:
  """Strips partitioning boxes from an ``eval_shape`` tree without constraints."""
  return jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
  )
