"""The v1 routing policy: load-balanced decode choice and conditional disaggregation."""

from __future__ import annotations

import pytest

from router.policy import Candidate, LoadBalancedPolicy, NoInstanceAvailable, RouteRequest


def cand(
    iid: str, *, running: int = 0, free: int | None = 100, queued: int = 0, cached: int = 0
) -> Candidate:
    return Candidate(iid, f"addr-{iid}", queued, running, free, cached)


REQ = RouteRequest(num_prompt_tokens=100, block_size=16)  # needs 7 blocks


def test_decode_goes_to_fewest_running_then_most_free_blocks() -> None:
    policy = LoadBalancedPolicy(disaggregation_threshold=32)
    decode = [cand("d0", running=3), cand("d1", running=1, free=50), cand("d2", running=1, free=80)]
    assert policy.route(REQ, decode, []).decode.instance_id == "d2"
    tied = [cand("d1"), cand("d0")]
    assert policy.route(REQ, tied, []).decode.instance_id == "d0"  # then by id: deterministic


def test_decode_without_room_for_the_prompt_is_avoided() -> None:
    policy = LoadBalancedPolicy(32)
    decode = [cand("d0", running=0, free=3), cand("d1", running=5, free=40)]
    assert policy.route(REQ, decode, []).decode.instance_id == "d1"
    # When nobody has room, the least loaded still gets it (its scheduler queues it).
    full = [cand("d0", running=2, free=1), cand("d1", running=1, free=2)]
    assert policy.route(REQ, full, []).decode.instance_id == "d1"
    # An instance without a load report yet is assumed to have room.
    fresh = [cand("d0", running=0, free=None), cand("d1", running=1)]
    assert policy.route(REQ, fresh, []).decode.instance_id == "d0"


def test_prefill_goes_to_fewest_queued_tokens() -> None:
    policy = LoadBalancedPolicy(32)
    prefill = [cand("p0", queued=500), cand("p1", queued=20), cand("p2", queued=300)]
    decision = policy.route(REQ, [cand("d0")], prefill)
    assert decision.prefill is not None and decision.prefill.instance_id == "p1"
    assert decision.uncached_tokens == 100


@pytest.mark.parametrize(
    ("prompt", "cached_blocks", "remote"),
    [
        (31, 0, False),  # below the threshold: the decode instance prefills
        (32, 0, True),  # at the threshold: disaggregated
        (100, 5, False),  # 100 - 80 cached = 20 uncached
        (100, 3, True),  # 100 - 48 cached = 52 uncached
    ],
)
def test_threshold_counts_only_uncached_tokens(
    prompt: int, cached_blocks: int, remote: bool
) -> None:
    policy = LoadBalancedPolicy(32)
    decision = policy.route(
        RouteRequest(prompt, 16), [cand("d0", cached=cached_blocks)], [cand("p0")]
    )
    assert (decision.prefill is not None) is remote
    assert decision.uncached_tokens == prompt - cached_blocks * 16


def test_cached_prefix_keeps_a_long_prompt_on_decode() -> None:
    policy = LoadBalancedPolicy(32)
    # 100 tokens, 6 blocks (96 tokens) cached on d0: 4 uncached tokens.
    decision = policy.route(REQ, [cand("d0", cached=6)], [cand("p0")])
    assert decision.prefill is None and decision.uncached_tokens == 4
    # Cache hits break ties between equally loaded decode instances.
    decision = policy.route(REQ, [cand("d0", cached=1), cand("d1", cached=6)], [cand("p0")])
    assert decision.decode.instance_id == "d1" and decision.prefill is None


def test_no_prefill_pool_is_colocated_and_no_decode_is_an_error() -> None:
    policy = LoadBalancedPolicy(0)
    assert policy.route(REQ, [cand("d0")], []).prefill is None
    with pytest.raises(NoInstanceAvailable):
        policy.route(REQ, [], [cand("p0")])
    with pytest.raises(ValueError, match="disaggregation_threshold"):
        LoadBalancedPolicy(-1)
