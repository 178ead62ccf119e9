"""Input-pipeline throughput for one process: tokens/s out of make_train_iterator.

python benchmarks/data_throughput.py [--seq_len=1024] [--batch=8] [--num_workers=0] [--steps=200]
  [--source=bundled|synthetic]
Counts row slots (B x L per batch) and real tokens (slots that are not padding).
"""

import dataclasses
import time

from absl import app
from absl import flags
import numpy as np

from gemma3_train import config as config_lib
from gemma3_train import data

_SEQ_LEN = flags.DEFINE_integer('seq_len', 1024, 'data.seq_len')
_BATCH = flags.DEFINE_integer('batch', 8, 'rows per batch (one process)')
_WORKERS = flags.DEFINE_integer('num_workers', 0, 'data.num_workers')
_STEPS = flags.DEFINE_integer('steps', 200, 'timed batches (after 5 warm-up batches)')
_SOURCE = flags.DEFINE_string('source', 'bundled', 'data.source')


@dataclasses.dataclass
class PackingStats:
  """Running packing efficiency: real tokens / row slots over the batches seen."""

  real: int = 0
  slots: int = 0

  def update(self, batch) -> None:
    seg = np.asarray(batch['segment_ids'])
    self.real += int(np.count_nonzero(seg))
    self.slots += seg.size

  @property
  def efficiency(self) -> float:
    return self.real / max(self.slots, 1)


def main(_):
  c = config_lib.Config().replace(data=dict(seq_len=_SEQ_LEN.value, num_workers=_WORKERS.value,
                          source=_SOURCE.value),
                train=dict(global_batch_size=_BATCH.value))
  t0 = time.perf_counter()
  it = data.make_train_iterator(c)
  for _ in range(5):
    next(it)
  t1 = time.perf_counter()
  stats = PackingStats()
  for _ in range(_STEPS.value):
    stats.update(next(it))
  dt = time.perf_counter() - t1
  print(f'source={_SOURCE.value} seq_len={_SEQ_LEN.value} batch={_BATCH.value} '
        f'workers={_WORKERS.value}: start+warm-up {t1 - t0:.2f}s, {_STEPS.value} batches in '
        f'{dt:.2f}s = {stats.slots / dt:,.0f} tokens/s ({stats.real / dt:,.0f} real tokens/s), '
        f'{_STEPS.value / dt:.1f} batches/s, packing efficiency {stats.efficiency:.4f}')
  if hasattr(it, 'close'):
    it.close()


if __name__ == '__main__':
  app.run(main)
