"""One orbax CheckpointManager under WORKDIR/checkpoints, and the restore order.

Restore order (train.py calls `restore_or_init`):
  (1) the newest complete checkpoint in this workdir: train state, data iterator, step.
      A checkpoint whose write was interrupted is never listed (orbax writes to a temporary
      directory and renames it when complete). One that fails to read is skipped with a
      warning naming it, and the previous one is tried; nothing is deleted.
  (2) `checkpoint.init_from`: params only, from one of our checkpoints (a training workdir, a
      step of one, or a params-only checkpoint), a Hugging Face directory or a Kaggle/Flax
      checkpoint: read one decoder layer at a time in the canonical layout (convert), mapped to
      this model's state paths (layout) and placed straight into the current mesh's shardings;
      the optimizer starts fresh.
  (3) random init, born sharded.
Every restore reads straight into the sharded abstract state, so no host ever holds the whole
model, and a different mesh (8 devices -> 4) reshards on read (init_from: a different
model.scan_layers too).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from gemma3_train import config as config_lib
from gemma3_train import convert
from gemma3_train import layout
from gemma3_train.convert import ours

log = logging.getLogger(__name__)


def latest_step(workdir: str) -> int | None:
  """The newest complete step under WORKDIR/checkpoints (None: none), read without creating or
  writing anything: a directory listing, no CheckpointManager."""
  steps = ours.complete_steps(epath.Path(workdir) / 'checkpoints')
  return steps[-1] if steps else None


def saved_config(step_dir: epath.Path) -> dict[str, Any] | None:
  """The config (as saved JSON, a nested dict) a checkpoint step was written with."""
  path = step_dir / 'config'
  files = list(path.glob('*')) if path.exists() else []
  return json.loads(files[0].read_text()) if files else None


def check_compatible(step_dir: epath.Path, c: config_lib.Config) -> None:
  """A checkpoint of another model shape is a config mistake, never a reason to reinit."""
  saved = (saved_config(step_dir) or {}).get('model', {})
  for k in config_lib.MODEL_SHAPE_FIELDS:
    ours = getattr(c.model, k)
    if k in saved and saved[k] != ours:
      raise config_lib.ConfigError(
          f'model.{k}={ours}: expected {saved[k]} to resume the checkpoint at {step_dir} '
          '(use a new --workdir for a different model)')


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
      log.warning('Received signal %d: will checkpoint at the next step and exit.', signum)
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
      log.info('Checkpoint for step %d %s to %s', step,
                   'being written' if self.config.checkpoint.async_save else 'written',
                   self.directory)
    return saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # --- restore -----------------------------------------------------------------

  def _set_aside(self, step: int, aside: epath.Path) -> None:
    """Renames an unreadable step out of orbax's way (kept for inspection, never deleted), so
    that the resumed run can write that step number again."""
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self.manager.reload()

  def restore_latest(self, abstract_state: Any, data_iter: Any | None) -> tuple[Any, int] | None:
    """(state, step) from the newest readable checkpoint, or None when there is none."""
    steps = ours.complete_steps(self.directory)[::-1]
    for step in steps:
      check_compatible(self.directory / str(step), self.config)
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
        log.warning('Checkpoint %s is unreadable (%s: %s); moved to %s, trying the previous '
                        'one.', self.directory / str(step), type(e).__name__, str(e)[:200], aside)
        self._set_aside(step, aside)
        continue
      if data_iter is not None and not has_data:
        log.warning('Checkpoint %d has no data iterator state; data restarts.', step)
      log.info('Resumed from %s', self.directory / str(step))
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


def _place_streamed(src: convert.Source, cfg: config_lib.ModelConfig,
                    abstract_params: Any) -> Any:
  """Reads src one decoder layer at a time and puts each leaf on its devices at once.

  Host memory holds the embedding, then what src holds to give a layer (one layer for HF and
  params-only checkpoints; a 27b layer is 1.7 GB in float32, the model 108 GB). A scanned
  leaf's per-layer pieces wait on the devices, already sharded, and are stacked there into the
  leaf's sharding as soon as its last layer has arrived.
  """
  abstract = {key: var.get_value() for key, var in nnx.to_flat_state(abstract_params)}
  placed: dict[tuple, jax.Array] = {}
  pieces: dict[tuple, dict[int, jax.Array]] = {}
  num_blocks = layout.num_blocks(cfg)

  def put(key: tuple, block: int | None, value: np.ndarray) -> None:
    name = '/'.join(map(str, key))
    if key not in abstract:
      raise config_lib.ConfigError(f'checkpoint.init_from: {name} is not a parameter of this '
                                   'model (model.scan_layers or a shape field differs?)')
    if block is None:
      placed[key] = _place(abstract[key], value, name)
      return
    pieces.setdefault(key, {})[block] = _place(_per_layer(abstract[key]), value,
                                               f'{name}[{block}]')
    if len(pieces[key]) == num_blocks:  # each leaf's pieces are freed once stacked
      stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=abstract[key].sharding)
      by_block = pieces.pop(key)
      placed[key] = stack(*(by_block[b] for b in range(num_blocks)))

  top = src.top()
  for name, key in layout.TOP_PATHS.items():
    put(key, None, top[name])
  del top
  for i, layer in convert.layers(src):
    for key, block, value in layout.layer_state_leaves(cfg, i, layer):
      put(key, block, value)
  missing = [k for k in abstract if k not in placed]
  if missing:
    raise config_lib.ConfigError(
        f'checkpoint.init_from: no value for {"/".join(map(str, missing[0]))}')
  flat = [(key, var.replace(placed[key])) for key, var in nnx.to_flat_state(abstract_params)]
  return nnx.from_flat_state(flat)


def load_init_params(path: str, c: config_lib.Config, abstract_state: Any) -> Any:
  """Params only (order (2)), placed in abstract_state['params'] shardings, from any checkpoint
  convert reads: one of our training workdirs (its newest complete step) or steps, our
  params-only checkpoint (gemma3-convert import), a HF directory or a Kaggle checkpoint.

  Read one decoder layer at a time (_place_streamed), so no host holds the whole model; the
  optimizer moments of a training checkpoint are never read."""
  try:
    src = convert.open_source(path, c.model)
    for k in config_lib.MODEL_SHAPE_FIELDS:
      if getattr(src.cfg, k) != getattr(c.model, k):
        raise config_lib.ConfigError(
            f'model.{k}={getattr(c.model, k)}: checkpoint.init_from={path} has '
            f'{getattr(src.cfg, k)}')
    params = _place_streamed(src, c.model, abstract_state['params'])
  except convert.ConversionError as e:
    raise config_lib.ConfigError(f'checkpoint.init_from={path!r}: {e}') from e
  if isinstance(src, convert.TrainSource):
    log.info('Took params from step %s of %s', src.path.name, path)
  else:
    log.info('Took params from %s', path)
  return params
