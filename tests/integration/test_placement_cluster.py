"""Placement on a simulated multi-node Ray cluster: three raylets on this machine, two of them
with four fake GPUs each (``ray.cluster_utils.Cluster``)."""

import dataclasses
import time

import pytest

from moestack.config.schema import Layout
from moestack.parallel import GPUS, SHAPES, PlanRequest, plan
from moestack.parallel.placement import PlacementError, check_bundle_nodes
from moestack.serve.placement import (
    bundle_nodes,
    check_app_fits_cluster,
    cluster_nodes,
    model_server_options,
    reserve,
)
from moestack.testing.configs import fake_config, fake_model

pytestmark = pytest.mark.integration

GPUS_PER_NODE = 4
H100_X4 = dataclasses.replace(GPUS["h100"], gpus_per_node=GPUS_PER_NODE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    small = {"object_store_memory": 80 * 1024**2}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **small})
    gpu_nodes = [c.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE, **small) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    try:
        yield c, {n.node_id for n in gpu_nodes}
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def _two_node_plan():
    return plan(PlanRequest(SHAPES["mixtral-8x7b"], H100_X4, 8, context_tokens=8192,
                            layout=Layout(tensor_parallel_size=4, data_parallel_size=2,
                                          expert_parallel=True)))


def test_two_node_plan_bundles_land_four_per_gpu_node(cluster):
    from ray.util.placement_group import remove_placement_group

    _, gpu_nodes = cluster
    p = _two_node_plan()
    assert p.fits and p.nodes == 2
    bundles, strategy = p.placement()
    bundles = [{**b, "CPU": 0.25} for b in bundles]
    pg = reserve(bundles, strategy, timeout_s=60)
    try:
        where = bundle_nodes(pg)
        assert set(where) == gpu_nodes
        assert sorted(where.count(n) for n in gpu_nodes) == [4, 4]
        check_bundle_nodes(where, p.layout.tensor_parallel_size)
    finally:
        remove_placement_group(pg)


def test_serve_replica_of_a_two_node_layout_lands_where_the_plan_says(cluster):
    import ray
    from ray import serve

    from moestack.serve.model_server import ModelServer

    _, gpu_nodes = cluster
    model = fake_config(fake_model(
        name="ep-moe", accelerator="gpu", gpu="h100", gpus_per_node=GPUS_PER_NODE,
        cpus_per_worker=0.25, parallelism={"tensor_parallel_size": 4, "data_parallel_size": 2,
                                           "expert_parallel": True})).models[0]
    opts = model_server_options(model)
    assert opts["placement_group_strategy"] == _two_node_plan().placement()[1] == "PACK"
    check_app_fits_cluster([model])
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    handle = serve.run(serve.deployment(ModelServer).options(**opts)
                       .bind(model.model_dump(mode="json"), None),
                       name="placement", route_prefix=None)
    try:
        handle.health.remote().result(timeout_s=60)
        tables = [t for t in ray.util.placement_group_table().values()
                  if t["state"] == "CREATED" and len(t["bundles"]) == 8]
        assert len(tables) == 1
        where = list(tables[0]["bundles_to_node_id"].values())
        assert sorted(where.count(n) for n in gpu_nodes) == [4, 4]
        check_bundle_nodes(where, 4)
    finally:
        serve.delete("placement")


def test_layout_larger_than_the_cluster_fails_at_once_with_the_reason(cluster):
    model = fake_config(fake_model(
        accelerator="gpu", gpu="h100", gpus_per_node=GPUS_PER_NODE,
        parallelism={"tensor_parallel_size": 4, "data_parallel_size": 4})).models[0]
    started = time.monotonic()
    with pytest.raises(PlacementError, match="GPU: needs 16, the cluster has 8"):
        check_app_fits_cluster([model])
    assert time.monotonic() - started < 5


def test_single_node_layout_larger_than_any_node_fails_before_creating_a_group(cluster):
    import ray

    before = len(ray.util.placement_group_table())
    with pytest.raises(PlacementError, match="on one node"):
        reserve([{"GPU": 1.0, "CPU": 0.25}] * 6, "STRICT_PACK", timeout_s=30)
    assert len(ray.util.placement_group_table()) == before
    assert sum(n.get("GPU", 0) for n in cluster_nodes()) == 8


def test_group_blocked_by_other_work_times_out_with_a_clear_error(cluster):
    from ray.util.placement_group import remove_placement_group

    holder = reserve([{"GPU": 4.0}] * 2, "STRICT_SPREAD", timeout_s=60)
    try:
        started = time.monotonic()
        with pytest.raises(PlacementError, match="not ready after 3 s"):
            reserve([{"GPU": 1.0}] * 4, "STRICT_PACK", timeout_s=3)
        assert time.monotonic() - started < 20
    finally:
        remove_placement_group(holder)
