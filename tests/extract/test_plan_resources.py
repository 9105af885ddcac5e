"""Unit tests of ``plan_resources``: actor pools sized so that no pool starves the read tasks.

The 2-core deadlock (an actor pool holding both cores while Ray Data's read tasks wait, so the
job never progresses) is what these invariants rule out.
"""

from __future__ import annotations

import pytest

from cusa.extract.ray_runner import plan_resources


@pytest.mark.parametrize("cpus", [1.0, 2.0, 4.0, 16.0, 96.0])
@pytest.mark.parametrize("n_teachers", [1, 2])
def test_cpu_only_pools_leave_half_the_cpus_to_reading(cpus, n_teachers):
    plan = plan_resources({"CPU": cpus}, n_teachers, None)
    assert plan.num_gpus == 0.0
    assert plan.actors >= 1 and plan.torch_threads >= 1
    held = plan.actors * n_teachers * plan.num_cpus
    assert held <= cpus / 2 + 1e-9  # the teachers never hold more than half the CPUs
    assert 0 < plan.read_cpus <= 1.0
    assert held + plan.read_cpus <= cpus  # one read task always fits beside every actor
    assert plan.num_cpus <= 1.0


def test_two_cores_get_fractional_actors():
    """A 2-CPU machine (the one CI runs on) with image and text teachers."""
    plan = plan_resources({"CPU": 2.0}, 2, None)
    assert plan.actors == 1 and plan.num_cpus == 0.5 and plan.read_cpus == 0.5


@pytest.mark.parametrize("cpus", [0.25, 0.5])
def test_fractional_cpu_clusters_still_plan(cpus):
    plan = plan_resources({"CPU": cpus}, 2, None)
    assert plan.actors == 1 and 0 < plan.num_cpus <= cpus / 2
    assert plan.read_cpus == 0.25 and plan.torch_threads == 1


@pytest.mark.parametrize(("gpus", "cpus"), [(1.0, 8.0), (4.0, 32.0), (8.0, 128.0)])
def test_gpu_clusters_put_one_actor_per_gpu_shared_by_the_teachers(gpus, cpus):
    plan = plan_resources({"CPU": cpus, "GPU": gpus}, 2, None)
    assert plan.actors == int(gpus)
    assert plan.num_gpus == 0.5  # image and text teacher share each GPU
    assert plan.actors * 2 * plan.num_gpus <= gpus
    assert plan.actors * 2 * plan.num_cpus <= cpus / 2 + 1e-9
    assert plan.torch_threads >= 1


def test_an_explicit_actor_count_wins():
    assert plan_resources({"CPU": 16.0}, 2, 3).actors == 3
    assert plan_resources({"CPU": 16.0, "GPU": 4.0}, 1, 2).actors == 2
    assert plan_resources({"CPU": 16.0, "GPU": 4.0}, 1, 2).num_gpus == 1.0


def test_missing_resources_default_to_one_cpu():
    plan = plan_resources({}, 1, None)
    assert plan.actors == 1 and plan.num_gpus == 0.0 and plan.num_cpus == 0.5
