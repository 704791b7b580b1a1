"""Helpers of the bulk tests: `cli.py embed` in process, and waiting on a job's manifest."""
import json
import os
import subprocess

from click.testing import CliRunner

import cli
from runtime.bulk.output import MANIFEST
from tests.servers import wait_until


def embed(model_dir, *args):
    return CliRunner().invoke(cli.main, ["embed", model_dir, *args, "--device", "cpu",
                                         "--batch-size", "8"])


def complete_shards(out) -> int:
    """How many shards the job writing `out` has recorded as complete (0 before its manifest)."""
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            return len(json.load(f)["shards"])
    except (OSError, ValueError):
        return 0


def wait_for_shards(proc: subprocess.Popen, out, count: int, *, timeout: float = 180) -> None:
    """Wait until the running job `proc` has `count` complete shards; fail with its stderr when
    it ends first."""
    wait_until(lambda: proc.poll() is not None or complete_shards(out) >= count,
               timeout=timeout, what=f"{count} complete shard(s) in {out}")
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    assert complete_shards(out) >= count
