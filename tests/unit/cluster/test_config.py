"""The typed cluster config: defaults, YAML plus overrides, and every cross-field rule
failing at build time with the field named; plus the builder's checks against the
model and the settings it hands the deployments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray import serve

from cluster.builder import build_app, check_against_model, router_settings, worker_settings
from cluster.config import ClusterConfig, ConfigError
from cluster.config_file import load_config
from engine.kv_cache import KVCacheLayout
from kv_transfer.transport import TransportKind
from registry import Role


def test_defaults_are_the_laptop_setup() -> None:
    c = load_config()
    assert [(p.name, p.role, p.replicas, p.tp, p.pp) for p in c.pools] == [
        ("prefill", Role.PREFILL, 1, 1, 1),
        ("decode", Role.DECODE, 1, 1, 1),
    ]
    assert (
        c.model.source == "smollm2-135m-instruct" and c.model.served_id == "smollm2-135m-instruct"
    )
    assert (c.server.host, c.server.grpc_port, c.server.http_port) == ("127.0.0.1", 9000, 8000)
    assert c.redis.url is None and c.ray.address is None
    assert c.prefill_pool is not None and c.generating_pool.name == "decode"
    assert c.required_cpus() == 3.0
    assert c.pools[0].num_threads == 1 and c.pools[0].device == "cpu"


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: lab\n"
        "model: {source: /models/llama, max_model_len: 4096}\n"
        "pools:\n"
        "  - {name: p, role: prefill, replicas: 2, resources_per_rank: {CPU: 2}}\n"
        "  - {name: d, role: decode, engine: {kv_cache_bytes: 1GiB}}\n"
        "redis: {url: 'redis://10.0.0.5:6379/0'}\n"
    )
    c = load_config(
        path, ["pools.d.replicas=3", "server.grpc_port=9100", "router.disaggregation_threshold=8"]
    )
    assert c.name == "lab" and c.model.served_id == "llama" and c.model.max_model_len == 4096
    assert [(p.name, p.replicas) for p in c.pools] == [("p", 2), ("d", 3)]
    assert int(c.pools[1].engine.kv_cache_bytes) == 1 << 30
    assert c.pools[0].num_threads == 2  # torch threads follow the CPU share
    assert c.server.grpc_port == 9100 and c.router.disaggregation_threshold == 8
    assert c.required_cpus() == 1 + 2 * 2 + 3


def test_colocated_only_and_pool_override_by_index() -> None:
    c = load_config(None, ["pools=[{name: main, role: colocated}]", "pools.0.replicas=2"])
    assert c.prefill_pool is None and c.generating_pool.replicas == 2


def test_secrets_are_not_printed() -> None:
    c = load_config(None, ["server.api_key=s3cret", "server.grpc_bearer_token=t0ken"])
    dumped = str(c.model_dump(mode="json"))
    assert "s3cret" not in dumped and "t0ken" not in dumped
    assert c.server.api_key is not None and c.server.api_key.get_secret_value() == "s3cret"


BAD = [
    (["pools=[{name: a, role: decode}, {name: a, role: prefill}]"], "duplicate pool names"),
    (
        ["pools=[{name: a, role: decode}, {name: b, role: colocated}, {name: c, role: prefill}]"],
        "exactly one decode or colocated pool",
    ),
    (["pools=[{name: a, role: colocated}, {name: b, role: prefill}]"], "needs a decode pool"),
    (["pools=[{name: a, role: decode}]"], "use role colocated"),
    (["pools=[{name: a, role: prefill}]"], "exactly one decode or colocated pool"),
    (
        ["pools=[{name: a, role: prefill}, {name: b, role: prefill}, {name: c, role: decode}]"],
        "at most one prefill pool",
    ),
    (["pools.prefill.engine.block_size=8"], "block_size"),
    (["server.grpc_port=8000"], "server.grpc_port"),
    (["server.grpc_tls_cert_file=/etc/cert.pem"], "terminate TLS"),
    (["pools.decode.replicas=0"], "pools.decode.replicas"),
    (["pools.decode.replica=2"], "pools.decode.replica"),  # a typo is not ignored
    (["pools.decode.role=encoder"], "pools.decode.role"),
    (["pools.decode.resources_per_rank={CPU: -1}"], "resources_per_rank"),
    (["pools.decode.engine.kv_cache_bytes=lots"], "kv_cache_bytes"),
    (["redis.url=http://localhost"], "redis.url"),
    (["redis.lease_ttl_s=1", "redis.load_report_interval_s=2"], "load_report_interval_s"),
    (["router.max_prompt_tokens=2048"], "router.max_prompt_tokens"),
    (["router.prompt_chars_per_token=0"], "router.prompt_chars_per_token"),
    (["router.max_messages=0"], "router.max_messages"),
    (["router.tokenizer_threads=0"], "router.tokenizer_threads"),
    (["router.max_queued_requests=0"], "router.max_queued_requests"),
    (["router.health_watch_max_s=0"], "router.health_watch_max_s"),
    (["router.max_migrations=-1"], "router.max_migrations"),
    (["pools.decode.graceful_shutdown_timeout_s=1"], "pools.decode.graceful_shutdown_timeout_s"),
    (["name=has:colon"], "name"),
    (["model.dtype=int4"], "model.dtype"),
    (["kv_transfer.faults=[{kind: explode}]"], "kv_transfer.faults.0.kind"),
    (["tracing.sample_ratio=1.5"], "tracing.sample_ratio"),
    (["tracing.otlp_endpoint=collector:4318"], "tracing.otlp_endpoint"),
    (["tracing.otlp_endpoint=grpc://collector:4317"], "tracing.otlp_endpoint"),
    (["tracing.max_requests=0"], "tracing.max_requests"),
    (["tracing.sampling=0.5"], "tracing.sampling"),  # a typo is not ignored
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[1] for b in BAD])
def test_invalid_config_names_the_problem(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid cluster config") as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_tracing_settings_reach_every_deployment(tiny_model_dir: Path) -> None:
    c = load_config(
        None,
        [
            "tracing.sample_ratio=0.25",
            "tracing.otlp_endpoint=http://127.0.0.1:4318/v1/traces",
            "tracing.max_requests=9",
        ],
    )
    t = router_settings(c, str(tiny_model_dir), "redis://x").tracing
    assert (t.enabled, t.sample_ratio, t.otlp_endpoint, t.max_requests) == (
        True, 0.25, "http://127.0.0.1:4318/v1/traces", 9,
    )  # fmt: skip
    for pool in c.pools:
        assert worker_settings(c, pool, str(tiny_model_dir), "redis://x").tracing == t
    assert not load_config(None, ["tracing.enabled=false"]).tracing.enabled


def test_bad_override_syntax_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config(None, ["pools.decode.replicas"])
    with pytest.raises(ConfigError, match="no list entry named 'nope'"):
        load_config(None, ["pools.nope.replicas=2"])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def _tiny(model_dir: Path, *overrides: str) -> ClusterConfig:
    return load_config(
        None,
        [
            f"model.source={model_dir}",
            "model.max_model_len=256",
            "pools.prefill.engine.kv_cache_bytes=4MiB",
            "pools.decode.engine.kv_cache_bytes=4MiB",
            *overrides,
        ],
    )


def test_builder_checks_the_config_against_the_model(tiny_model_dir: Path) -> None:
    d = str(tiny_model_dir)
    assert check_against_model(_tiny(tiny_model_dir), d).num_layers == 4
    with pytest.raises(ConfigError, match=r"model\.max_model_len: 4096 exceeds"):
        check_against_model(_tiny(tiny_model_dir, "model.max_model_len=4096"), d)
    with pytest.raises(ConfigError, match=r"pools.decode.engine.kv_cache_bytes: holds \d+ tokens"):
        check_against_model(_tiny(tiny_model_dir, "pools.decode.engine.kv_cache_bytes=16KiB"), d)
    with pytest.raises(ConfigError, match=r"pools\.prefill: tp=3"):
        check_against_model(_tiny(tiny_model_dir, "pools.prefill.tp=3"), d)
    with pytest.raises(ConfigError, match=r"pools\.decode: pp=3 does not divide num_layers=4"):
        check_against_model(_tiny(tiny_model_dir, "pools.decode.pp=3"), d)
    with pytest.raises(ConfigError, match=r"pools\.prefill: pp=8 does not divide num_layers=4"):
        check_against_model(_tiny(tiny_model_dir, "pools.prefill.pp=8"), d)
    layouts = _tiny(tiny_model_dir, "pools.prefill.tp=2", "pools.decode.tp=4", "pools.decode.pp=2")
    assert check_against_model(layouts, d).num_kv_heads == 2  # tp=4 replicates the 2 KV heads


def test_the_kv_budget_is_checked_per_rank(tiny_model_dir: Path) -> None:
    """A budget that holds max_model_len tokens of half the layers: enough for a rank of
    a pp=2 pool, too little for a whole model."""
    d = str(tiny_model_dir)
    mc = check_against_model(_tiny(tiny_model_dir), d)
    half = KVCacheLayout(mc.num_layers // 2, mc.num_kv_heads, mc.head_dim, 16, 1, torch.float32)
    budget = f"pools.decode.engine.kv_cache_bytes={-(-256 // 16) * half.block_bytes}"
    with pytest.raises(ConfigError, match=r"pools.decode.engine.kv_cache_bytes: holds \d+ tokens"):
        check_against_model(_tiny(tiny_model_dir, budget), d)
    assert check_against_model(_tiny(tiny_model_dir, budget, "pools.decode.pp=2"), d)


def test_builder_settings_and_app(tiny_model_dir: Path) -> None:
    c = _tiny(
        tiny_model_dir,
        "server.api_key=k",
        "router.max_prompt_tokens=100",
        "kv_transfer.transport=shm",
        "pools.decode.rank_timeout_s=15",
        "pools.decode.engine.cpu_linear=onednn",
    )
    ws = worker_settings(c, c.pools[1], str(tiny_model_dir), "redis://127.0.0.1:1/0")
    assert (ws.rank_timeout_s, ws.rank_start_timeout_s) == (15.0, 120.0)
    assert ws.engine.cpu_linear == "onednn"
    assert worker_settings(c, c.pools[0], str(tiny_model_dir), "r").engine.cpu_linear == "auto"
    with pytest.raises(ConfigError, match="cpu_linear"):
        _tiny(tiny_model_dir, "pools.decode.engine.cpu_linear=fast")
    e = ws.engine
    assert (ws.pool, ws.role, e.max_model_len, e.kv_cache_bytes, ws.transport) == (
        "decode",
        Role.DECODE,
        256,
        4 << 20,
        TransportKind.SHM,
    )
    assert (e.model, e.tp, e.pp, e.block_size) == (str(tiny_model_dir), 1, 1, 16)
    assert ws.faults == ()
    drill = _tiny(tiny_model_dir, "kv_transfer.faults=[{kind: corrupt, after: 2}]")
    (fault,) = worker_settings(drill, drill.pools[0], str(tiny_model_dir), "redis://x").faults
    assert (fault.kind.value, fault.after, fault.times) == ("corrupt", 2, 1)
    assert worker_settings(drill, drill.pools[1], str(tiny_model_dir), "redis://x").faults == ()
    rs = router_settings(c, str(tiny_model_dir), "redis://127.0.0.1:1/0")
    assert rs.has_prefill_pool and rs.http_api_key == "k" and rs.grpc_bearer_token is None
    assert rs.limits.max_prompt_tokens == 100 and rs.limits.max_model_len == 256
    # The character bound comes from the token bound, before any tokenizing.
    assert (rs.limits.max_prompt_chars, rs.limits.max_messages) == (16 * 100, 100)
    assert [p.name for p in rs.pools] == ["prefill", "decode"]
    app = build_app(c, model_dir=str(tiny_model_dir), redis_url="redis://127.0.0.1:1/0")
    assert isinstance(app, serve.Application)


def test_serve_queues_are_bounded(tiny_model_dir: Path) -> None:
    c = _tiny(
        tiny_model_dir,
        "router.max_queued_requests=77",
        "router.max_inflight_requests=40",
        "router.max_health_watches=5",
    )
    app = build_app(c, model_dir=str(tiny_model_dir), redis_url="redis://127.0.0.1:1/0")
    router = app._bound_deployment
    assert router.max_queued_requests == 77
    assert router.max_ongoing_requests == 40 + 5 + 64  # requests, watches, status calls
    pools = [a._bound_deployment for a in router.init_args[1:]]
    assert [(p.name, p.max_queued_requests) for p in pools] == [("decode", 40), ("prefill", 40)]
    rs = router_settings(c, str(tiny_model_dir), "redis://x")
    assert (rs.max_health_watches, rs.health_watch_max_s) == (5, 300.0)


def test_streams_move_and_drain_as_configured(tiny_model_dir: Path) -> None:
    c = _tiny(
        tiny_model_dir, "router.max_migrations=3", "pools.decode.graceful_shutdown_timeout_s=12"
    )
    rs = router_settings(c, str(tiny_model_dir), "redis://x")
    assert rs.max_migrations == 3 and rs.timeouts.drain_s == 6.0  # half the decode pool's
    app = build_app(c, model_dir=str(tiny_model_dir), redis_url="redis://127.0.0.1:1/0")
    pools = {
        a._bound_deployment.name: a._bound_deployment for a in app._bound_deployment.init_args[1:]
    }
    timeouts = {n: d._deployment_config.graceful_shutdown_timeout_s for n, d in pools.items()}
    assert timeouts == {"decode": 12, "prefill": 30}
    assert _tiny(tiny_model_dir).router.max_migrations == 2  # on by default


def test_kv_transfer_secret_reaches_every_pool_and_nothing_prints_it(
    tiny_model_dir: Path,
) -> None:
    """The cluster secret sealing KV control HELLOs: long enough, generated once per
    build when unset (the same for every pool), carried in the pools' settings only."""
    with pytest.raises(ConfigError, match=r"kv_transfer\.secret"):
        load_config(None, ["kv_transfer.secret=too-short"])
    given = "g" * 40
    c = _tiny(tiny_model_dir, f"kv_transfer.secret={given}")
    assert c.with_transfer_secret() is c
    ws = worker_settings(c, c.pools[0], str(tiny_model_dir), "redis://x")
    assert ws.transfer_secret == given and given not in repr(ws) and given not in repr(c)
    unset = _tiny(tiny_model_dir)
    made, again = unset.with_transfer_secret(), unset.with_transfer_secret()
    assert made.kv_transfer.secret is not None and again.kv_transfer.secret is not None
    secret = made.kv_transfer.secret.get_secret_value()
    assert len(secret) >= 32 and secret != again.kv_transfer.secret.get_secret_value()
    app = build_app(unset, model_dir=str(tiny_model_dir), redis_url="redis://127.0.0.1:1/0")
    router = app._bound_deployment
    secrets = {a._bound_deployment.init_args[0].transfer_secret for a in router.init_args[1:]}
    (one,) = secrets  # both pools got the same, generated one
    assert one is not None and len(one) >= 32
    assert one not in str(router.init_args[0])  # the router never gets it


@pytest.mark.parametrize("name", ["local.yaml", "colocated.yaml"])
def test_example_configs_are_valid(name: str, smollm2_dir: Path) -> None:
    path = Path(__file__).resolve().parents[3] / "deploy" / "configs" / name
    config = load_config(path)
    check_against_model(config, str(smollm2_dir))
    if name == "local.yaml":
        assert config == load_config()  # the file spells out the defaults


def test_nested_pools_key_is_not_the_top_level_pool_list() -> None:
    from cluster.config_file import load_config

    cfg = load_config(None, ["kubernetes.pools.decode.memory=6GiB"])
    assert cfg.kubernetes.pools["decode"].memory == 6 * 1024**3
    assert [p.name for p in cfg.pools] == ["prefill", "decode"]  # defaults untouched
