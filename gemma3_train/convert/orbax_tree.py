"""Partial reads of Orbax PyTree checkpoints, with orbax.checkpoint's PyTree API (not v1).

Every Orbax reader (Kaggle/Flax releases, our params-only checkpoints, the params of our training
checkpoints) lists leaves with `leaves` and reads the few it needs with `read`; nothing else of
the checkpoint is read. Leaves are named by their key path, as strings.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gemma3_train.convert.source import ConversionError

Keys = tuple[str, ...]


def leaves(path: epath.Path) -> dict[Keys, Any]:
  """{key path: leaf metadata (shape, dtype)} of the checkpoint at path, reading no arrays."""
  try:
    # The handler reads just the tree's _METADATA (the checkpointer also wants the step's).
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'{path}: not a readable Orbax checkpoint ({e})') from None
  return {tuple(str(getattr(k, 'key', k)) for k in key_path): leaf
          for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read(path: epath.Path, wanted: Iterable[Keys], meta: dict[Keys, Any]
         ) -> dict[Keys, np.ndarray]:
  """Restores just the `wanted` leaves (listed in `meta`, from `leaves`) to host numpy arrays
  in their stored dtype (an Orbax partial restore)."""
  wanted = list(wanted)
  if not wanted:
    return {}
  item: dict = {}
  for keys in wanted:
    node = item
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(meta[keys].shape, meta[keys].dtype)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=args, partial_restore=True))
  values = {}
  for keys in wanted:
    node = out
    for k in keys:
      node = node[k]
    values[keys] = np.asarray(node)
  return values
