"""The Ray Serve application builder and its options, without a cluster: the shipped config file is one Ray
accepts, its arguments build the application, and bad replica settings are refused with the values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from qimg.serve.ray_app import RayOptions
from qimg.serve.settings import Settings

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "ray-serve.yaml"
PG = "postgresql://qimg@db/qimg"


def test_the_shipped_config_is_a_serve_config_and_builds():
    pytest.importorskip("ray")
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    from qimg.serve.ray_app import build

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    app = config.applications[0]
    assert app.import_path == "qimg.serve.ray_app:build"
    built = build({**app.args, "serve": app.args["serve"].replace("/models/Qwen-Image-2.1", "qimg-tiny")
                   .replace("--api-key-file /etc/qimg/api-keys", "--api-key k")})
    assert type(built).__name__ == "Application"


def test_replica_options():
    fixed = RayOptions(replicas=3, gpus_per_replica=1).replica_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 1.0} and fixed["max_ongoing_requests"] == 1
    scaled = RayOptions(min_replicas=1, max_replicas=4).replica_options()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 1 and scaled["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.parametrize("options, settings, message", [
    (RayOptions(replicas=0), Settings(store=PG), "--replicas must be >= 1, got 0"),
    (RayOptions(min_replicas=2), Settings(store=PG), "both --min-replicas and --max-replicas"),
    (RayOptions(min_replicas=3, max_replicas=2), Settings(store=PG), "got 3 and 2"),
    (RayOptions(gpus_per_replica=-1), Settings(store=PG), "got -1"),
    (RayOptions(replicas=2), Settings(), "give --store postgresql://"),
    (RayOptions(), Settings(store=PG, run_jobs=False), "drop --no-worker"),
])
def test_bad_replica_settings_are_refused(options, settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options.check(settings)


def test_the_command_line_refuses_ray_without_a_store(capsys):
    from qimg.cli import main

    assert main(["serve", "--ray", "--replicas", "2"]) == 2
    assert "--store postgresql://" in capsys.readouterr().err
