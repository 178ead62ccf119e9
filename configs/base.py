"""The default config: every field at its default. Copy this file to start a config of your own.

Run: gemma3-train --config=configs/base.py --workdir=/tmp/run [--config.optim.lr=1e-3 ...]
Each field, its default and its help text are declared once, in gemma3_train/config.py;
`gemma3-train --helpfull` lists them. Size and task configs start from the same defaults
(`config_lib.default_config_dict()`) and change only what differs.
"""

import ml_collections

from gemma3_train import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  return config_lib.default_config_dict()
