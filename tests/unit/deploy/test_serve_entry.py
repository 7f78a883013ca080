"""The application builder serveConfigV2 names: from the rendered args and the pods'
environment it builds the same Serve application `pdserve up` deploys, with the
secrets, the Redis URL and the registry scope taken from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray import serve

from cluster.config import ConfigError
from cluster.config_file import load_config
from cluster.k8s.serve_config import pod_config
from cluster.serve_entry import IMPORT_PATH, app, config_from_args, entry_args

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy/examples/cpu-dev/k8s/rayservice.yaml"
ENV = {
    "PDSERVE_REDIS_URL": "redis://:pw@pdserve-redis:6379/0",
    "PDSERVE_HTTP_API_KEY": "k3y",
    "PDSERVE_GRPC_BEARER_TOKEN": "t0ken",
    "PDSERVE_REGISTRY_SCOPE": "pdserve-raycluster-x7k2p",
    "PDSERVE_KV_TRANSFER_SECRET": "f" * 64,
}


def _rendered_args() -> dict[str, Any]:
    rayservice = yaml.safe_load(EXAMPLE.read_text())
    (application,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert application["import_path"] == IMPORT_PATH
    args: dict[str, Any] = application["args"]
    return args


def test_args_carry_the_config_without_secrets() -> None:
    kv = "kv-" + "x" * 40
    config = load_config(
        None, ["server.api_key=s3cret", "pools.decode.replicas=3", f"kv_transfer.secret={kv}"]
    )
    args = entry_args(config)
    assert "s3cret" not in str(args) and "kubernetes" not in args["config"]
    assert kv not in str(args)
    back = config_from_args(args, ENV)
    assert back.pools[1].replicas == 3
    assert back.server.api_key is not None and back.server.api_key.get_secret_value() == "k3y"
    assert back.server.grpc_bearer_token is not None
    assert back.redis.url == ENV["PDSERVE_REDIS_URL"]
    assert back.name == "pdserve.pdserve-raycluster-x7k2p"
    assert back.kv_transfer.secret is not None
    assert back.kv_transfer.secret.get_secret_value() == "f" * 64
    with pytest.raises(ConfigError, match=r"PDSERVE_KV_TRANSFER_SECRET: .*at least 32"):
        config_from_args(args, {**ENV, "PDSERVE_KV_TRANSFER_SECRET": "short"})


def test_without_a_redis_url_it_says_which_variable() -> None:
    with pytest.raises(ConfigError, match="PDSERVE_REDIS_URL"):
        config_from_args(entry_args(pod_config(load_config())), {})
    with pytest.raises(ConfigError, match=r"args\.config"):
        config_from_args({}, ENV)
    with pytest.raises(ConfigError, match="invalid cluster config in args"):
        config_from_args({"config": {"pools": "two"}}, ENV)


def test_builds_the_app_of_the_rendered_example(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    application = app(_rendered_args())
    assert isinstance(application, serve.Application)
    router = application._bound_deployment
    assert router.name == "router"
    pools = {a._bound_deployment.name: a._bound_deployment for a in router.init_args[1:]}
    assert set(pools) == {"prefill", "decode"}
    for name, deployment in pools.items():
        assert deployment.ray_actor_options["resources"] == {f"pdserve_pool_{name}": 1.0}
        settings = deployment.init_args[0]
        assert settings.transfer_host == "auto"
        assert settings.redis_url == ENV["PDSERVE_REDIS_URL"]
        assert settings.cluster == "pdserve.pdserve-raycluster-x7k2p"
        assert settings.transfer_secret == ENV["PDSERVE_KV_TRANSFER_SECRET"]
        assert settings.transfer_secret not in repr(settings)
        assert Path(settings.engine.model) == smollm2_dir
