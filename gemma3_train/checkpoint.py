"""One orbax CheckpointManager under WORKDIR/checkpoints, and the restore order.

Restore order (train.py calls `restore_or_init`):
  (1) the newest complete checkpoint in this workdir: train state, data iterator, step.
      A checkpoint whose write was interrupted is never listed (orbax writes to a temporary
      directory and renames it when complete). One that fails to read is skipped with a
      warning naming it, and the previous one is tried; nothing is deleted.
  (2) `checkpoint.init_from`: params only, from one of our checkpoints, a Hugging Face
      directory or a Kaggle/Flax checkpoint, placed straight into the current mesh's shardings;
      the optimizer starts fresh.
  (3) random init, born sharded.
Every restore reads straight into the sharded abstract state, so no host ever holds the whole
model, and a different mesh (8 devices -> 4) reshards on read.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from gemma3_train import config as config_lib

_MODEL_SHAPE_FIELDS = ('vocab_size', 'num_layers', 'embed_dim', 'mlp_dim', 'num_heads',
                       'num_kv_heads', 'head_dim')


class Checkpointer:
  """Saves {state, data iterator, config} every N steps; restores per the order above."""

  def __init__(self, workdir: str, c: config_lib.Config):
    self.config = c
    self.directory = epath.Path(workdir) / 'checkpoints'
    k = c.checkpoint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=k.keep, keep_period=k.keep_period or None,
        enable_async_checkpointing=k.async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})
    self._preempted = threading.Event()

  # --- preemption --------------------------------------------------------------

  def install_signal_handlers(self) -> None:
    """SIGTERM (what GKE and TPU VMs send) asks for a save at the next step boundary.

    One process: a Python handler sets a flag. Several processes: jax.distributed.initialize
    already installed the preemption sync manager's SIGTERM notifier, which tells every process
    and has them agree on one step to save at (`reached_preemption` below). A Python handler
    would replace that notifier, so none is installed; and no per-step collective is needed.
    """
    if jax.process_count() > 1:
      return
    def on_sigterm(signum, frame):
      del frame
      logging.warning('Received signal %d: will checkpoint at the next step and exit.', signum)
      self._preempted.set()
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, on_sigterm)

  def should_stop(self, step: int) -> bool:
    """True (on every process at the same step) once SIGTERM or a preemption notice arrived.

    Called once per step on every process: the sync manager needs each step reported.
    """
    return self._preempted.is_set() or self.manager.reached_preemption(step)

  # --- save --------------------------------------------------------------------

  def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    items = {'state': ocp.args.StandardSave(state),
             'config': ocp.args.JsonSave(json.loads(self.config.to_json()))}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info('Checkpoint for step %d %s to %s', step,
                   'being written' if self.config.checkpoint.async_save else 'written',
                   self.directory)
    return saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # --- restore -----------------------------------------------------------------

  def _check_compatible(self, step: int) -> None:
    """A checkpoint of another model shape is a config mistake, never a reason to reinit."""
    path = self.directory / str(step) / 'config'
    files = list(path.glob('*')) if path.exists() else []
    if not files:
      return
    saved = json.loads(files[0].read_text()).get('model', {})
    for k in _MODEL_SHAPE_FIELDS:
      ours = getattr(self.config.model, k)
      if k in saved and saved[k] != ours:
        raise config_lib.ConfigError(
            f'model.{k}={ours}: expected {saved[k]} to resume the checkpoint at '
            f'{self.directory / str(step)} (use a new --workdir for a different model)')

  def _set_aside(self, step: int, aside: epath.Path) -> None:
    """Renames an unreadable step out of orbax's way (kept for inspection, never deleted), so
    that the resumed run can write that step number again."""
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()

  def restore_latest(self, abstract_state: Any, data_iter: Any | None) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, or None when there is none."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      self._check_compatible(step)
      items = {'state': ocp.args.StandardRestore(abstract_state)}
      has_data = (self.directory / str(step) / 'data').exists()
      if data_iter is not None and has_data:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        if 'tree structures do not match' in str(e):
          # Readable, but a different state layout: the config changed (e.g. optim.clip_norm
          # switched on/off, scan_layers). A config mistake, not damage: touch nothing.
          raise config_lib.ConfigError(
              f'--config: the train state layout differs from the checkpoint at '
              f'{self.directory / str(step)} (a changed model or optim setting?); rerun with '
              f'the config it was written with, or use a new --workdir') from e
        aside = self.directory / f'unreadable_{step}'
        logging.warning('Checkpoint %s is unreadable (%s: %s); moved to %s, trying the previous '
                        'one.', self.directory / str(step), type(e).__name__, str(e)[:200], aside)
        self._set_aside(step, aside)
        continue
      if data_iter is not None and not has_data:
        logging.warning('Checkpoint %d has no data iterator state; data restarts.', step)
      logging.info('Resumed from %s', self.directory / str(step))
      return restored['state'], step
    if steps:
      raise RuntimeError(f'{self.directory}: no readable checkpoint among steps {steps}; '
                         'refusing to start over in a workdir that has checkpoints')
    return None


def _place(abstract: Any, value: np.ndarray, name: str) -> jax.Array:
  """Puts one host array into its sharding (each device takes only its slice)."""
  if tuple(value.shape) != tuple(abstract.shape):
    raise config_lib.ConfigError(f'checkpoint.init_from: {name} has shape {value.shape}, '
                                 f'the model expects {abstract.shape}')
  value = np.asarray(value).astype(abstract.dtype)
  return jax.make_array_from_callback(abstract.shape, abstract.sharding, lambda idx: value[idx])


def _per_layer(abstract: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The abstract of one layer's slice of a scanned [blocks, ...] leaf, sharded the same way."""
  spec = tuple(abstract.sharding.spec)
  spec += (None,) * (len(abstract.shape) - len(spec))
  sharding = jax.sharding.NamedSharding(abstract.sharding.mesh,
                                        jax.sharding.PartitionSpec(*spec[1:]))
  return jax.ShapeDtypeStruct(abstract.shape[1:], abstract.dtype, sharding=sharding)


def _place_streamed(src: Any, cfg: config_lib.ModelConfig, abstract_params: Any) -> Any:
  """Reads src one decoder layer at a time and puts each leaf on its devices at once.

  Host memory holds the embedding, then one layer (a 27b layer is 1.7 GB in float32, the
  model 108 GB). A scanned leaf's per-layer pieces wait on the devices, already sharded, and
  are stacked there into the leaf's sharding when its last layer has arrived.
  """
  from gemma3_train import model as model_lib  # pylint: disable=g-import-not-at-top
  abstract = {key: var.get_value() for key, var in nnx.to_flat_state(abstract_params)}
  placed: dict[tuple, jax.Array] = {}
  pieces: dict[tuple, list[jax.Array]] = {}

  def put(key: tuple, value: np.ndarray, block: int | None) -> None:
    name = '/'.join(map(str, key))
    if key not in abstract:
      raise config_lib.ConfigError(f'checkpoint.init_from: {name} is not a parameter of this '
                                   'model (model.scan_layers or a shape field differs?)')
    if block is None:
      placed[key] = _place(abstract[key], value, name)
    else:
      piece = _place(_per_layer(abstract[key]), value, f'{name}[{block}]')
      pieces.setdefault(key, []).append(piece)

  top = src.top()
  put(('embedder', 'embedding'), top['embedding'], None)
  put(('final_norm', 'scale'), top['final_norm'], None)
  del top
  for i in range(cfg.num_layers):
    # pylint: disable=protected-access
    prefix, block = model_lib._layer_prefix(cfg, i)
    for sub, value in model_lib._layer_to_leaves(src.layer(i)).items():
      put(prefix + sub, value, block)
  for key in list(pieces):
    stack = jax.jit(lambda *xs: jax.numpy.stack(xs), out_shardings=abstract[key].sharding)
    placed[key] = stack(*pieces.pop(key))  # pop: each leaf's pieces are freed once stacked
  missing = [k for k in abstract if k not in placed]
  if missing:
    raise config_lib.ConfigError(
        f'checkpoint.init_from: no value for {"/".join(map(str, missing[0]))}')
  flat = [(key, var.replace(placed[key])) for key, var in nnx.to_flat_state(abstract_params)]
  return nnx.from_flat_state(flat)


def load_init_params(path: str, c: config_lib.Config, abstract_state: Any) -> Any:
  """Params only (order (2)) from one of our training workdirs (its newest checkpoint), our
  params-only checkpoint (gemma3-convert import), a HF directory or a Kaggle checkpoint.

  A training workdir is restored by orbax straight into the shardings; the other kinds are read
  one decoder layer at a time (_place_streamed), so no host holds the whole model."""
  from gemma3_train import convert  # pylint: disable=g-import-not-at-top
  if (epath.Path(path) / 'checkpoints').is_dir():
    restored = Checkpointer(path, c).restore_latest(abstract_state, None)
    if restored is None:
      raise config_lib.ConfigError(f'checkpoint.init_from={path!r}: expected a workdir with a '
                                   'checkpoint; its checkpoints/ folder is empty')
    logging.info('Took params from step %d of %s', restored[1], path)
    return restored[0]['params']
  try:
    src = convert.open_source(path, c.model)
    for k in _MODEL_SHAPE_FIELDS:
      if getattr(src.cfg, k) != getattr(c.model, k):
        raise config_lib.ConfigError(
            f'model.{k}={getattr(c.model, k)}: checkpoint.init_from={path} has '
            f'{getattr(src.cfg, k)}')
    return _place_streamed(src, c.model, abstract_state['params'])
  except convert.ConversionError as e:
    raise config_lib.ConfigError(f'checkpoint.init_from={path!r}: {e}') from e
