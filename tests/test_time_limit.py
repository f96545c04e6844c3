"""trainers.common.TimeLimit: the wall-clock budget both trainers stop on."""

import time

from muse_jax.trainers import common


def test_no_limit_is_never_reached():
  assert not common.TimeLimit(0).reached()
  assert not common.TimeLimit(None).reached()


def test_limit_is_reached_after_its_seconds():
  limit = common.TimeLimit(0.05)
  assert not limit.reached()
  time.sleep(0.06)
  assert limit.reached()
