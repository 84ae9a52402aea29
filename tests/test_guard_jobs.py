"""Guards for job specs and their scheduled forms (issue 24, rows 7 and 8): the cron dialect the
schedulers share, and the entrypoint's GPUs on both ways a job reaches a cluster (a KubeRay RayJob,
``lsnet jobs submit``)."""
from __future__ import annotations

import pytest
import yaml

from pipelines.jobs.spec import JobSpecError, load_job_spec


def _deploy(spec):
    from pipelines.jobs.schedule import deployment

    return deployment(spec, image="registry.example.com/lsnet:0123abc", storage="s3://bucket/lsnet",
                      mlflow_uri="http://mlflow:5000")


def _spec(tmp_path, **fields):
    data = {"name": "guard", "command": "train", "config": "configs/tiny_bbox.yaml", **fields}
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_job_spec(path), path


@pytest.mark.parametrize("cron", ["0 0 3 * * *", "*/30 0 3 * * * 2027", "0 3 * *", "@daily"])
def test_schedule_must_be_five_cron_fields(tmp_path, cron):
    """KubeRay, Kubernetes CronJobs and crontab read 5 fields; croniter alone also takes a seconds field."""
    with pytest.raises(JobSpecError, match=r"schedule: .* is not a valid 5-field cron expression"):
        _spec(tmp_path, schedule=cron)


def test_five_field_schedule_reaches_every_emitted_form(tmp_path):
    from pipelines.jobs.schedule import crontab_line, k8s_cron_job, ray_cron_job

    spec, _ = _spec(tmp_path, schedule="15 3 * * 1", time_zone="Europe/Berlin", address="http://head:8265")
    assert ray_cron_job(spec, _deploy(spec))["spec"]["schedule"] == "15 3 * * 1"
    assert k8s_cron_job(spec, _deploy(spec))["spec"]["schedule"] == "15 3 * * 1"
    assert k8s_cron_job(spec, _deploy(spec))["spec"]["timeZone"] == "Europe/Berlin"
    line = crontab_line(spec)
    assert line.startswith("CRON_TZ=Europe/Berlin\n15 3 * * 1 cd ")


def test_unknown_time_zone_is_refused(tmp_path):
    """(hole next to row 7) a misspelt zone would only fail on the cluster, at the first run."""
    with pytest.raises(JobSpecError, match=r"time_zone: 'Europe/Berln' is not an IANA time zone"):
        _spec(tmp_path, schedule="0 3 * * *", time_zone="Europe/Berln")


def test_rayjob_entrypoint_gpus_and_cpus_are_the_specs(tmp_path):
    from pipelines.jobs.schedule import ray_cron_job, ray_job_spec

    spec, _ = _spec(tmp_path, resources={"num_cpus": 3, "num_gpus": 1}, schedule="0 3 * * *")
    job = ray_job_spec(spec, _deploy(spec))
    assert (job["entrypointNumCpus"], job["entrypointNumGpus"]) == (3.0, 1.0)
    assert ray_cron_job(spec, _deploy(spec))["spec"]["jobTemplate"]["entrypointNumGpus"] == 1.0
    none, _ = _spec(tmp_path, resources={"num_cpus": 2})
    job = ray_job_spec(none, _deploy(none))
    assert "entrypointNumGpus" not in job and job["entrypointNumCpus"] == 2.0


def test_submit_passes_the_entrypoint_resources(tmp_path, monkeypatch):
    """(second path of row 8) ``lsnet jobs submit`` reserves the spec's resources for the driver."""
    from pipelines.jobs.client import submit_spec

    monkeypatch.setenv("LSNET_GIT_COMMIT", "c0ffee")
    spec, _ = _spec(tmp_path, resources={"num_cpus": 3, "num_gpus": 1, "memory": 2**30, "resources": {"x": 2}})

    class Client:
        def submit_job(self, **kwargs):
            self.kwargs = kwargs
            return "raysubmit_1"

    client = Client()
    assert submit_spec(client, spec) == "raysubmit_1"
    got = {k: client.kwargs[k] for k in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory",
                                         "entrypoint_resources")}
    assert got == {"entrypoint_num_cpus": 3, "entrypoint_num_gpus": 1, "entrypoint_memory": 2**30,
                   "entrypoint_resources": {"x": 2}}
    assert client.kwargs["entrypoint"] == spec.entrypoint()


@pytest.mark.parametrize("resources, key", [({"num_gpus": -1}, "num_gpus"), ({"num_cpus": -0.5}, "num_cpus"),
                                            ({"memory": -1}, "memory"), ({"resources": {"tpu": -1}}, "tpu")])
def test_negative_entrypoint_resources_are_refused(tmp_path, resources, key):
    """(hole next to row 8) Ray refuses them only after the upload, on the cluster."""
    with pytest.raises(JobSpecError, match=rf"resources.{key}: must be >= 0"):
        _spec(tmp_path, resources=resources)


@pytest.mark.parametrize("group", [{"replicas": 2, "min_replicas": 3}, {"replicas": 2, "max_replicas": 1},
                                   {"replicas": -1}, {"gpu": -1}])
def test_worker_group_bounds_must_hold_its_replicas(tmp_path, group):
    """(hole next to row 8) a RayJob cluster whose worker group KubeRay cannot size."""
    with pytest.raises(JobSpecError, match=r"cluster.workers 'workers': needs gpu >= 0 and 0 <= min_replicas"):
        _spec(tmp_path, cluster={"workers": [group]})


def test_worker_group_bounds_reach_the_rayjob(tmp_path):
    from pipelines.jobs.schedule import ray_job_spec

    spec, _ = _spec(tmp_path, cluster={"workers": [{"replicas": 2, "min_replicas": 1, "max_replicas": 4, "gpu": 1}]})
    (group,) = ray_job_spec(spec, _deploy(spec))["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 1, 4)
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
