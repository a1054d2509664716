"""Placement of ModelServer replicas: bundles, strategy, feasibility against cluster nodes
(:mod:`moestack.parallel.placement`) and the Serve deployment options built from them."""

import pytest

from moestack.parallel.placement import (
    PlacementError,
    check_bundle_nodes,
    check_config_fits_cluster,
    check_feasible,
    placement_strategy,
    worker_bundles,
)
from moestack.serve.placement import model_server_options
from moestack.testing.configs import fake_config, fake_model

NODE = {"CPU": 32.0, "GPU": 8.0}


def _model(**kw):
    return fake_config(fake_model(**kw)).models[0]


def test_single_node_replica_is_strict_packed_and_multi_node_is_packed():
    assert placement_strategy(8, 8) == "STRICT_PACK"
    assert placement_strategy(16, 8) == "PACK"
    assert placement_strategy(1, 8) == "PACK"


def test_multi_gpu_replica_actor_leaves_the_gpus_to_vllm_workers():
    opts = model_server_options(_model(accelerator="gpu", gpu="h100", parallelism={
        "tensor_parallel_size": 8, "data_parallel_size": 2, "expert_parallel": True}))
    assert opts["placement_group_bundles"] == worker_bundles(16)
    assert opts["placement_group_strategy"] == "PACK"
    assert opts["ray_actor_options"]["num_gpus"] == 0


def test_single_gpu_replica_actor_owns_its_gpu():
    opts = model_server_options(_model(accelerator="gpu", gpu="h100"))
    assert opts["ray_actor_options"]["num_gpus"] == 1


def test_cpu_replica_bundles_are_cpu_slots_on_one_node():
    opts = model_server_options(_model(parallelism={"tensor_parallel_size": 2}))
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert opts["placement_group_strategy"] == "STRICT_PACK"


def test_feasible_two_node_layout_passes():
    check_feasible(worker_bundles(16), "PACK", [NODE, NODE, {"CPU": 8.0}])


def test_more_gpus_than_the_cluster_has_is_refused_with_counts():
    with pytest.raises(PlacementError, match="GPU: needs 16, the cluster has 8"):
        check_feasible(worker_bundles(16), "PACK", [NODE, {"CPU": 8.0}])


def test_strict_pack_larger_than_any_node_is_refused():
    with pytest.raises(PlacementError, match="on one node"):
        check_feasible(worker_bundles(8), "STRICT_PACK", [{"CPU": 32.0, "GPU": 4.0}] * 2)


def test_bundle_too_large_for_every_node_is_refused():
    with pytest.raises(PlacementError, match="fits on no node"):
        check_feasible([{"CPU": 40.0, "GPU": 1.0}], "PACK", [NODE, NODE])


def test_replicas_that_strict_pack_need_a_node_each():
    model = _model(accelerator="gpu", gpu="h100", num_replicas=2,
                   parallelism={"tensor_parallel_size": 8})
    check_config_fits_cluster(model, [NODE, NODE])
    with pytest.raises(PlacementError, match="replica 2"):
        check_config_fits_cluster(model, [NODE, {"CPU": 32.0, "GPU": 4.0},
                                          {"CPU": 32.0, "GPU": 4.0}])


def test_tensor_parallel_group_split_across_nodes_is_detected():
    check_bundle_nodes(["a"] * 8 + ["b"] * 8, 8)
    with pytest.raises(PlacementError, match="straddle nodes"):
        check_bundle_nodes(["a"] * 5 + ["b"] * 3, 4)


def test_autoscaled_model_is_checked_with_its_initial_replicas():
    model = _model(accelerator="gpu", gpu="h100", parallelism={"tensor_parallel_size": 8},
                   autoscaling={"enabled": True, "min_replicas": 1, "initial_replicas": 2,
                                "max_replicas": 4})
    check_config_fits_cluster(model, [NODE, NODE])
    with pytest.raises(PlacementError, match="replica 2"):
        check_config_fits_cluster(model, [NODE])
