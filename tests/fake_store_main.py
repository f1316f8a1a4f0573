"""`python -m fake_store_main ARGS`: `python -m univit_jax.main ARGS` with the fake object store of
`fakes.py` installed from the environment (`fakes.subprocess_env`: the store's folder and the
GCS server the test process runs), so a subprocess run can use a `gs://` or `fakegcs://`
workdir. Tests only."""

import os

from absl import app

import fakes
from univit_jax import main

if __name__ == "__main__":
  fakes.install(os.environ[fakes.ROOT_ENV], os.environ[fakes.URL_ENV])
  app.run(main.main, flags_parser=main.parse_flags)
