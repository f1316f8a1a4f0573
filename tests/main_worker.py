"""`python tests/main_worker.py ARGS --process I --processes P --port PORT`: one process of a
P-process job on localhost (`helpers.start_processes`) running `python -m univit_jax.main ARGS`,
so a test can run any mode as a multi-host job does. It joins the job as `UNIVIT_DISTRIBUTED=1`
makes the entry point do (`collectives.initialize`), with the test's coordinator."""

import argparse
import os
import sys

from absl import app

if __name__ == "__main__":
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  sys.path[:0] = [tests_dir, os.path.dirname(tests_dir)]
  import helpers

  parser = argparse.ArgumentParser()
  helpers.add_process_arguments(parser)
  args, main_args = parser.parse_known_args()
  helpers.join_processes(args)

  from univit_jax import main
  app.run(main.main, argv=[sys.argv[0], *main_args], flags_parser=main.parse_flags)
