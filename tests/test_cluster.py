"""cluster.yaml, checked offline with the Ray cluster launcher's own schema and validator."""

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def validate(config: dict) -> dict:
    """What `ray up` does to the file before it calls the cloud: merge the provider's defaults,
    then validate. Ray's helpers are private; without them, the schema the wheel ships."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # a later Ray moved them: the schema still catches most mistakes
        schema = Path(ray.autoscaler.__path__[0]) / "ray-schema.json"
        jsonschema.validate(config, json.loads(schema.read_text()))
        if sum(t.get("min_workers", 0) for t in config["available_node_types"].values()) > \
                config["max_workers"]:
            raise ValueError("the sum of min_workers exceeds the global max_workers")
        return config
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def test_cluster_yaml_is_valid_for_the_launcher(config):
    prepared = validate(config)
    assert prepared["head_node_type"] == "head.cpu"
    workers = prepared["available_node_types"]["worker.gpu"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1  # it autoscales
    # The image carries the Ray this project pins (the driver and the nodes must agree).
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_the_validator_bites(config):
    typo = copy.deepcopy(config)
    typo["available_node_types"]["worker.gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate(typo)

    too_many = copy.deepcopy(config)
    too_many["available_node_types"]["worker.gpu"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        validate(too_many)

    wrong_type = copy.deepcopy(config)
    wrong_type["available_node_types"]["worker.gpu"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong_type)


def test_token_auth_on_every_node_and_nothing_public(config):
    for command in start_commands(config):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    # MLflow listens on the head's private address.
    server = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    words = shlex.split(server)
    assert words[words.index("--host") + 1] == "$HEAD_IP"
    assert "HEAD_IP=$(hostname -I" in server  # the first (private) address of the head
    # ... with MLflow's basic-auth app, its login generated on the head (not in this file).
    assert words[words.index("--app-name") + 1] == "basic-auth"
    assert "secrets.token_urlsafe" in server and 'MLFLOW_AUTH_ADMIN_PASSWORD="$(cat' in server


def test_no_secret_in_the_file(config):
    text = CLUSTER_YAML.read_text()
    secret_patterns = [
        r"AKIA[0-9A-Z]{16}",  # AWS access key id
        r"(?i)aws_secret_access_key",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"(?i)RAY_AUTH_TOKEN\s*=",  # a token value in an environment variable
        # A password or key written out; one read from a file on the head ("$(cat ...)") is not.
        r"(?i)(password|secret_key)\s*[:=]\s*(?![\"']?\$)",
        r"\b[0-9a-f]{32,}\b",  # a token or key written out (Ray's tokens are 32 hex digits)
    ]
    for pattern in secret_patterns:
        assert not re.search(pattern, text), pattern
    # The token reaches the nodes from a file outside this repository.
    token_source = config["file_mounts"]["/home/ray/.ray/auth_token"]
    assert token_source.startswith("~/") or not Path(token_source).resolve().is_relative_to(ROOT)
