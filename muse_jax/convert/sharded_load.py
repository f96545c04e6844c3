"""Checkpoint tensors -> a sharded parameter tree, one tensor at a time.

A converter describes, for every leaf of a module's parameter tree, which checkpoint
tensor(s) fill it and how to bring them into our layout (a ``Source``). ``load_sharded``
then walks the leaves: each tensor is read from disk, transformed, cast, and
``jax.device_put`` straight into the ``NamedSharding`` that the leaf's logical axis
names give under the rules. Leaves stacked over layers (``nn.scan``) are allocated on
the devices once and each layer's tensor is written into its slice by a donated in-place
update. Host memory therefore peaks near one tensor (and its transposed, cast copy),
never the whole model, and device memory holds each parameter once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
import math
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from muse_jax.partitioning import DEFAULT_RULES, Rules, logical_shardings, unbox_abstract


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one parameter comes from: one checkpoint tensor, or one per layer (stacked)."""

  names: tuple[str, ...]  # checkpoint tensor names; one per layer when stacked.
  transform: Callable[[np.ndarray], np.ndarray] | None = None  # checkpoint layout -> ours.
  stacked: bool = False  # names[i] fills index i of the leading (layers) axis.


def fit_sharding(shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """Drops mesh axes from the dimensions they do not divide (those are replicated).

  A vocabulary of 32100 rows cannot be split 8 ways, say; replicating that dimension is
  better than refusing to load.
  """
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    size = math.prod(sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    if shape[dim] % size:
      logging.info(
        "replicating dimension %d of a %s parameter: mesh axes %s (%d) do not divide it",
        dim,
        shape,
        axes,
        size,
      )
      spec[dim] = None
  return NamedSharding(sharding.mesh, P(*spec))


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of one slice of a stacked parameter (its leading axis removed)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
  return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stacked, layer, index, axis=0)


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def load_sharded(
  abstract: Any,
  sources: Mapping[tuple[str, ...], Source],
  reader: Mapping[str, np.ndarray],
  *,
  unused: Callable[[str], bool] = lambda name: False,
  mesh: jax.sharding.Mesh | None = None,
  rules: Rules = DEFAULT_RULES,
) -> dict[str, Any]:
  """Fills a parameter tree from checkpoint tensors, each placed in its sharding.

  Args:
    abstract: the boxed ``jax.eval_shape`` of the parameters (shapes, dtypes, names).
    sources: flattened parameter path -> ``Source``, one for every leaf.
    reader: checkpoint tensor name -> array, read lazily (e.g. ``SafetensorsFolder``);
      its ``folder`` attribute, if any, names it in errors.
    unused: checkpoint tensors the model deliberately ignores.
    mesh: the device mesh; None places everything on the first device.
    rules: logical-to-mesh rules for the parameters' axis names.

  Returns:
    The (unboxed) parameter tree of ``jax.Array``s.

  Raises:
    KeyError: needed tensors are missing from the checkpoint.
    ValueError: a tensor has the wrong shape, or the checkpoint has tensors that neither
      a source nor ``unused`` accounts for (the config does not describe the weights).
  """
  where = getattr(reader, "folder", "checkpoint")
  plain = unbox_abstract(abstract)
  if mesh is None:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), plain)
  else:
    shardings = logical_shardings(abstract, mesh, rules)
  flat_abstract = traverse_util.flatten_dict(plain)
  flat_shardings = traverse_util.flatten_dict(shardings)
  if set(flat_abstract) != set(sources):
    raise ValueError(
      f"parameters without a source or sources without a parameter: {set(flat_abstract) ^ set(sources)}"
    )

  needed = {name for source in sources.values() for name in source.names}
  missing = sorted(needed - set(reader))
  if missing:
    raise KeyError(
      f"{where}: the checkpoint lacks {len(missing)} tensors that its config implies, e.g. {missing[:4]}"
    )
  unknown = sorted(n for n in reader if n not in needed and not unused(n))
  if unknown:
    raise ValueError(
      f"{where}: the checkpoint has {len(unknown)} tensors that its config does not account for, "
      f"e.g. {unknown[:4]}; the config and the weights disagree"
    )

  def read(name: str, source: Source, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    raw = reader[name]
    array = raw if source.transform is None else source.transform(raw)
    if array.shape != shape:
      raise ValueError(
        f"{where}: tensor {name!r} has shape {raw.shape}; the config implies {shape} (our layout)"
      )
    return np.asarray(array, dtype=dtype)

  params = {}
  for path, leaf in flat_abstract.items():
    source, sharding = sources[path], fit_sharding(leaf.shape, flat_shardings[path])
    if not source.stacked:
      params[path] = jax.device_put(read(source.names[0], source, leaf.shape, leaf.dtype), sharding)
      continue
    if len(source.names) != leaf.shape[0]:
      raise ValueError(
        f"{where}: {len(source.names)} tensors for a parameter stacked {leaf.shape[0]} deep"
      )
    stacked, layer_sharding = _zeros(leaf.shape, leaf.dtype, sharding), _layer_sharding(sharding)
    for i, name in enumerate(source.names):
      layer = jax.device_put(read(name, source, leaf.shape[1:], leaf.dtype), layer_sharding)
      stacked = _set_layer(stacked, layer, i)
    params[path] = stacked
  return traverse_util.unflatten_dict(params)
