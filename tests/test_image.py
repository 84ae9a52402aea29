"""The container image of the K8s manifests (issue 19 item 2): the Dockerfile's pins are pyproject.toml's,
the image name is one setting used by `make image` and `lsnet jobs schedule --emit k8s*`."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"


def _pins(requirements: list[str]) -> dict[str, str]:
    """{``name[extras]``: version} of the ``name==version`` requirements."""
    pins = {}
    for text in requirements:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            pins[f"{req.name.lower()}{extras}"] = exact[0]
    return pins


def _dockerfile() -> tuple[str, str, dict[str, str]]:
    """(Ray version of the base image, its Python tag, the pins the Dockerfile installs)."""
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-\$\{RAY_VARIANT\}\s*$", text, re.MULTILINE)
    variant = re.search(r"^ARG RAY_VARIANT=(py\d+)-(cpu|gpu)\s*$", text, re.MULTILINE)
    assert base and variant, "the Dockerfile's FROM / ARG RAY_VARIANT lines changed form"
    installed = re.findall(r'"([A-Za-z0-9_.\-\[\],]+==[^"\s]+)"', text)
    return base.group(1), variant.group(1), _pins(installed)


def test_the_dockerfile_installs_exactly_the_pins_of_pyproject():
    from pipelines.jobs.spec import ClusterTemplate

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pinned = _pins(project["dependencies"])
    assert {"torch", "torchvision", "mmcv-lite", "ray[default,train,tune]", "mlflow"} <= set(pinned)
    ray_version, python_tag, installed = _dockerfile()
    assert installed == pinned
    assert ray_version == pinned["ray[default,train,tune]"] == ClusterTemplate().ray_version
    python = f"{python_tag[2]}.{python_tag[3:]}"  # py311 -> 3.11
    assert SpecifierSet(project["requires-python"]).contains(f"{python}.0")


@pytest.mark.parametrize("emit", ["k8s", "k8s-cronjob"])
def test_the_manifests_name_the_image_setting(emit, monkeypatch, capsys):
    from pipelines.cli import main

    spec = str(REPO_ROOT / "jobs" / "nightly_ablations_tiny.yaml")
    extra = (["--address", "http://head:8265"] if emit == "k8s-cronjob" else []) + ["--pvc", "results"]

    def images(*args: str) -> set[str]:
        assert main(["jobs", "schedule", spec, "--emit", emit, *extra, *args]) == 0, capsys.readouterr().err
        found: set[str] = set()

        def walk(node):
            if isinstance(node, dict):
                found.update([node["image"]] if isinstance(node.get("image"), str) else [])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(yaml.safe_load(capsys.readouterr().out))
        return found

    monkeypatch.delenv("LSNET_IMAGE", raising=False)
    # no image named: refused rather than an unpinned default (issue 23 item 6)
    assert main(["jobs", "schedule", spec, "--emit", emit, *extra]) == 2
    assert "no container image: pass --image REGISTRY/lsnet:TAG" in capsys.readouterr().err
    monkeypatch.setenv("LSNET_IMAGE", "registry.example.com/ml/lsnet:0.1.0")
    assert images() == {"registry.example.com/ml/lsnet:0.1.0"}
    assert images("--image", "lsnet:abc123") == {"lsnet:abc123"}


def _fake_engine(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    engine = bin_dir / "docker"
    engine.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    engine.chmod(engine.stat().st_mode | stat.S_IEXEC)


def _make_image(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "image"], env=env, capture_output=True, text=True,
                          check=False)


def test_make_image_builds_with_the_setting_or_says_why_not(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    log = tmp_path / "engine.log"
    _fake_engine(tmp_path / "bin", log)
    env = {k: v for k, v in os.environ.items() if k not in ("LSNET_IMAGE", "IMAGE", "ENGINE", "RAY_VARIANT")}
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    run = _make_image(env)
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "info"
    assert re.fullmatch(r"build -t lsnet:([0-9a-f]{12}|unknown) --build-arg RAY_VARIANT=py311-cpu "
                        r"--build-arg LSNET_GIT_COMMIT=([0-9a-f]{40}|unknown) \.", calls[1]), calls[1]
    log.unlink()
    env["LSNET_IMAGE"] = "registry.example.com/ml/lsnet:0.1.0"
    assert _make_image(env).returncode == 0
    assert log.read_text().splitlines()[1].startswith("build -t registry.example.com/ml/lsnet:0.1.0 ")

    if shutil.which("docker", path="/usr/bin:/bin") or shutil.which("podman", path="/usr/bin:/bin"):
        return  # the "neither is installed" case cannot be staged on this machine
    env["PATH"] = "/usr/bin:/bin"
    none = _make_image(env)
    assert none.returncode != 0
    assert "make image: neither docker nor podman is installed here" in none.stderr
