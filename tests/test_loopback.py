"""Loopback clusters: free ports, one TF_CONFIG per task, every process gone afterwards."""

import json

import pytest

from fm_keras.loopback import LoopbackCluster, cluster_spec, free_ports, tf_config


def test_cluster_spec_gives_distinct_local_ports():
    cluster = cluster_spec(workers=2, ps=2, chief=True)
    assert {job: len(v) for job, v in cluster.items()} == {"chief": 1, "worker": 2, "ps": 2}
    addresses = [a for v in cluster.values() for a in v]
    assert len(set(addresses)) == 5 and all(a.startswith("localhost:") for a in addresses)
    assert len(set(free_ports(8))) == 8
    assert json.loads(tf_config(cluster, "ps", 1)) == {"cluster": cluster,
                                                         "task": {"type": "ps", "index": 1}}


def test_tasks_get_their_tf_config_and_are_killed(tmp_path):
    cluster = cluster_spec(workers=1, ps=1, chief=True)
    with LoopbackCluster(cluster, str(tmp_path)) as loop:
        servers = loop.start_servers()
        assert [(t.type, t.index) for t in servers] == [("worker", 0), ("ps", 0)]
        chief = loop.start("chief", 0, ["cluster-server"])  # the chief runs train, not a server
        loop_error = None
        try:
            loop.wait([chief], timeout=120)
        except RuntimeError as err:
            loop_error = str(err)
        assert "exited with 2" in loop_error and "this task is the chief" in loop_error
        assert all(t.process.poll() is None for t in servers)
        with pytest.raises(RuntimeError, match="still running after"):
            loop.wait(servers[:1], timeout=0.5)
    assert all(t.process.poll() is not None for t in servers)
