"""camserve.backends.threads: a worker's share of the cores."""
from __future__ import annotations

import os

import pytest

from camserve.backends.threads import cpu_count, torchserve_workers, worker_threads


@pytest.mark.parametrize("workers, cpus, share", [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8),
                                                  (0, 4, 4), (5, 16, 3)])
def test_the_share_never_oversubscribes(workers, cpus, share):
    assert worker_threads(workers, cpus=cpus) == share
    assert share * max(1, workers) <= max(cpus, max(1, workers))


@pytest.mark.parametrize("config, gpu, expected", [
    ({"minWorkers": 2, "maxWorkers": 4}, False, 4),   # the most it may run side by side
    ({"minWorkers": 3}, False, 3),
    ({}, False, 6),                                   # TorchServe's default: one per core
    ({"maxWorkers": True}, False, 6),                 # not a count
    ({}, True, 2),                                    # one per GPU
])
def test_torchserve_worker_count(config, gpu, expected):
    assert torchserve_workers(config, gpu=gpu, cpus=6, gpus=2) == expected


def test_cpu_count_reads_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cpu_count(quota) == min(affinity, 2)
    quota.write_text("max 100000\n")
    assert cpu_count(quota) == affinity
    assert cpu_count(tmp_path / "missing") == affinity
    quota.write_text("garbage")
    assert cpu_count(quota) == affinity
