"""A store on one machine's disk with training workers on other nodes is refused at start
(pipelines/tracking/store.py: check_store_reaches_workers), and ``--tracking-uri`` points any command at a
store (pipelines/cli/__init__.py)."""
from __future__ import annotations

import os

import pytest

from lsnet.config import ConfigError
from pipelines.tracking.store import check_store_for_cluster, check_store_reaches_workers, worker_resources

HEAD, OTHER = "head-node-id", "second-node-id"


def _node(node_id: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


TWO_CPU_NODES = [_node(HEAD, CPU=8.0), _node(OTHER, CPU=8.0)]


@pytest.mark.parametrize("uri", ["sqlite:////tmp/x/mlflow.db", "file:///tmp/mlruns", "./mlruns"])
def test_a_local_store_with_workers_on_two_nodes_is_refused_in_one_line(uri):
    with pytest.raises(ConfigError) as err:
        check_store_reaches_workers(uri, TWO_CPU_NODES, HEAD, {"CPU": 1.0})
    message = str(err.value)
    assert "\n" not in message and uri in message
    assert "1 other node(s)" in message and "2 can host one" in message
    assert "tracking server" in message and "--tracking-uri" in message


def test_a_tracking_server_on_two_nodes_is_fine():
    check_store_reaches_workers("http://10.0.0.1:5000", TWO_CPU_NODES, HEAD, {"CPU": 1.0})


def test_a_local_store_is_fine_when_only_the_drivers_node_can_host_a_worker():
    # the second node is dead, or lacks what a worker asks for (a GPU; 4 CPUs)
    check_store_reaches_workers("sqlite:////x.db", [_node(HEAD, CPU=8.0), _node(OTHER, alive=False, CPU=8.0)],
                                HEAD, {"CPU": 1.0})
    check_store_reaches_workers("sqlite:////x.db", [_node(HEAD, CPU=8.0, GPU=1.0), _node(OTHER, CPU=8.0)],
                                HEAD, {"CPU": 1.0, "GPU": 1.0})
    check_store_reaches_workers("sqlite:////x.db", [_node(HEAD, CPU=8.0), _node(OTHER, CPU=2.0)],
                                HEAD, {"CPU": 4.0})


def test_a_local_store_is_refused_when_the_only_worker_node_is_another():
    """A head that runs no workers (num-cpus=0, as KubeRay advises) and one worker node: rank 0, which
    logs, never runs beside the driver's disk."""
    with pytest.raises(ConfigError, match="1 other node"):
        check_store_reaches_workers("sqlite:////x.db", [_node(HEAD), _node(OTHER, CPU=4.0)], HEAD, {"CPU": 1.0})


def test_a_ray_client_driver_shares_no_disk_with_any_node():
    with pytest.raises(ConfigError, match="a Ray Client"):
        check_store_reaches_workers("sqlite:////x.db", [_node(HEAD, CPU=8.0)], HEAD, {"CPU": 1.0}, ray_client=True)


def test_worker_resources_follow_ray_trains_rule():
    assert worker_resources(2, False, None) == {"CPU": 1.0}
    assert worker_resources(2, True, None) == {"CPU": 1.0, "GPU": 1.0}
    assert worker_resources(2, True, {"CPU": 4, "GPU": 0.5}) == {"CPU": 4.0, "GPU": 0.5}
    assert worker_resources(2, False, {"CPU": 2, "GPU": 0}) == {"CPU": 2.0}


def test_the_real_local_cluster_passes_and_a_second_node_beside_it_is_refused(ray_session, monkeypatch):
    """On the test session's one-node Ray the check passes; the same view with a second node that can host a
    worker (ray.nodes() extended) is refused."""
    ray = ray_session
    uri = "sqlite:////tmp/lsnet-cluster-check/mlflow.db"
    check_store_for_cluster(uri, num_workers=2, use_gpu=False, resources_per_worker=None)
    real = ray.nodes()
    assert [n["NodeID"] for n in real if n["Alive"]] == [ray.get_runtime_context().get_node_id()]
    monkeypatch.setattr(ray, "nodes", lambda: [*real, _node(OTHER, CPU=2.0)])
    with pytest.raises(ConfigError, match="1 other node"):
        check_store_for_cluster(uri, num_workers=2, use_gpu=False, resources_per_worker=None)
    check_store_for_cluster("http://127.0.0.1:5000", num_workers=2, use_gpu=False, resources_per_worker=None)


# ---- --tracking-uri ---------------------------------------------------------------------------------

CONFIG = "configs/bbox_cpv_r2_101_dcn_2x.yaml"


def _printed_tracking_uri(capsys, argv: list[str]) -> str:
    import yaml

    from pipelines.cli import main

    assert main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)["tracking"]["uri"]


def test_tracking_uri_before_or_after_the_command_wins_over_env_and_config(capsys, monkeypatch):
    from pipelines.paths import REPO_ROOT

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    server = "http://127.0.0.1:5999"
    for argv in (["--tracking-uri", server, "train", CONFIG], [f"--tracking-uri={server}", "train", CONFIG],
                 ["train", CONFIG, "--tracking-uri", server],
                 ["--tracking-uri", server, "train", CONFIG, "--set", "tracking.uri=http://from-config:1"]):
        assert _printed_tracking_uri(capsys, [*argv, "--print-config"]) == server, argv
        assert os.environ["MLFLOW_TRACKING_URI"] == server  # for the processes the command starts
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    # a .db file is resolved once, to an absolute SQLite URI
    printed = _printed_tracking_uri(capsys, ["--tracking-uri", "runs.db", "train", CONFIG, "--print-config"])
    assert printed == f"sqlite:///{REPO_ROOT / 'runs.db'}"
    # without the option: the config, then the environment, as before
    assert _printed_tracking_uri(capsys, ["train", CONFIG, "--print-config"]) is None


def test_global_tracking_uri_reaches_commands_with_their_own_option(tmp_path, capsys):
    """``lsnet --tracking-uri URI runs`` reads the store the global option names."""
    from pipelines.cli import main
    from pipelines.tracking.tracker import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(tmp_path / "run", uri, "global-flag", run_name="seen-through-the-flag",
                         background=False, verbose=False)
    tracker.log_metrics({"loss": 0.5}, 0)
    assert tracker.close() is True
    assert main(["--tracking-uri", uri, "runs", "list", "--experiment", "global-flag"]) == 0
    assert "seen-through-the-flag" in capsys.readouterr().out


def test_tracking_uri_without_a_value_is_a_usage_error(capsys):
    from pipelines.cli import main

    assert main(["--tracking-uri"]) == 2
    assert "--tracking-uri needs a URI" in capsys.readouterr().err
