"""Block regions: gathers, scatters and copies move exactly the named bytes, and the
checksum catches changed bytes and misplaced blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import pytest
import torch

from kv_transfer import block_runs, word_sums
from kv_transfer.block_runs import runs
from kv_transfer.region_copies import copy_into, gather_checksummed, scatter_checksummed
from kv_transfer.regions import BlockRegion, LayerSpan, region_of
from kv_transfer.transport import in_parts, message_parts, region_parts, splits
from kv_transfer.word_sums import checksum

# [layer, kv, block, slot, head, dim]
SHAPE = (3, 2, 24, 4, 4, 16)
FRAGMENTED = (5, 9, 2, 17, 11, 0, 23, 3)
CONTIGUOUS = (8, 9, 10, 11, 12, 13, 14, 15)
MIXED = (4, 5, 6, 7, 20, 21, 22, 1)
RUNS = (0, 1, 2, 3, 12, 13, 14, 15)  # two runs of four


@pytest.fixture(params=["native", "by-index", "by-run"])
def run_rule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Move blocks that are not one run with the native kernel, block by block in one
    call; or, as without it (CUDA), by index (short runs) or one op per run (long
    ones). Every way must move the same bytes and give the same checksum."""
    if request.param != "native":
        assert word_sums.by_id(torch.zeros(2, 1, 1, 1, 2)) is not None  # the kernel is here
        monkeypatch.setattr(word_sums, "by_id", lambda *args, **kwargs: None)
        floor = 1 << 62 if request.param == "by-index" else 1
        monkeypatch.setattr(block_runs, "MIN_RUN_BYTES", floor)
        monkeypatch.setattr(block_runs, "MIN_GATHER_RUN_BYTES", floor)
    return str(request.param)


def _cache(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _expected(
    cache: torch.Tensor, layer: int, h0: int, h1: int, ids: tuple[int, ...]
) -> torch.Tensor:
    return cache[layer][:, list(ids)][:, :, :, h0:h1].contiguous()


def test_runs() -> None:
    assert runs((1, 2, 3, 7, 8, 0)) == [(0, 1, 3), (3, 7, 2), (5, 0, 1)]
    assert runs((4,)) == [(0, 4, 1)]
    assert runs(CONTIGUOUS) == [(0, 8, 8)]
    assert runs((3, 2, 1)) == [(0, 3, 1), (1, 2, 1), (2, 1, 1)]


def test_checksum_is_the_position_weighted_sum_of_block_words() -> None:
    payload = BlockRegion(_cache(torch.float32, 3), 1, 0, 4, MIXED).gather()
    words = payload.view(torch.int64)
    want = 0
    for i, block_sum in enumerate(words.sum(dim=(2, 3, 4)).reshape(-1).tolist()):
        want += block_sum * (2 * i + 1)
    assert checksum(payload) == want % (1 << 64)


@pytest.mark.usefixtures("run_rule")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids", [FRAGMENTED, CONTIGUOUS, MIXED])
def test_gather_scatter_copy(dtype: torch.dtype, ids: tuple[int, ...]) -> None:
    src_cache, dst_cache = _cache(dtype, 1), torch.zeros(SHAPE, dtype=dtype)
    src = BlockRegion(src_cache, 1, 1, 3, ids)
    payload = src.gather()
    assert payload.is_contiguous() and tuple(payload.shape) == src.shape
    assert torch.equal(payload, _expected(src_cache, 1, 1, 3, ids))
    assert checksum(payload) == src.checksum()

    for dst_ids in (FRAGMENTED, CONTIGUOUS, MIXED):
        before = dst_cache.clone()
        dst = BlockRegion(dst_cache, 2, 0, 2, dst_ids)
        dst.copy_from(src)
        assert torch.equal(dst.gather(), payload)
        # Nothing outside the region changed.
        after = dst_cache.clone()
        after[2][:, list(dst_ids), :, 0:2] = before[2][:, list(dst_ids), :, 0:2]
        assert torch.equal(after, before)
        dst_cache.zero_()
        dst.scatter(payload)
        assert torch.equal(dst.gather(), payload)
        dst_cache.zero_()


def test_checksum_catches_flips_and_swaps() -> None:
    payload = BlockRegion(_cache(torch.float32), 0, 0, 4, FRAGMENTED).gather()
    base = checksum(payload)
    for offset in (0, 1, 777, payload.numel() * 4 - 1):
        bad = payload.clone()
        bad.view(torch.uint8).view(-1)[offset] ^= 0x10
        assert checksum(bad) != base
    swapped = payload.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    assert checksum(swapped) != base
    kv_swapped = payload.flip(0).contiguous()
    assert checksum(kv_swapped) != base


def test_flip_byte_changes_the_checksum() -> None:
    region = BlockRegion(_cache(torch.bfloat16), 2, 0, 4, MIXED)
    before = region.checksum()
    region.flip_byte()
    assert region.checksum() != before


def test_bad_regions_are_refused() -> None:
    cache = _cache(torch.float32)
    for layer, h0, h1, ids in (
        (3, 0, 1, (0,)),
        (0, 2, 2, (0,)),
        (0, 0, 5, (0,)),
        (0, 0, 1, ()),
        (0, 0, 1, (24,)),
    ):
        with pytest.raises(IndexError):
            BlockRegion(cache, layer, h0, h1, ids)
    region = BlockRegion(cache, 0, 0, 2, (1, 2))
    with pytest.raises(ValueError):
        region.scatter(torch.zeros(2, 3, 4, 2, 16))
    with pytest.raises(ValueError):
        region.copy_from(BlockRegion(cache, 0, 0, 1, (1, 2)))


@pytest.mark.usefixtures("run_rule")
@pytest.mark.parametrize("ids", [CONTIGUOUS, MIXED, FRAGMENTED])
def test_layer_span_checksums_and_copies_layer_by_layer(ids: tuple[int, ...]) -> None:
    cache = _cache(torch.float32, 5)
    span = LayerSpan(cache, 0, 3, 1, 3, ids)
    assert span.shape == (3, 2, len(ids), 4, 2, 16)
    assert span.nbytes == 3 * span.regions[0].nbytes
    assert region_of(cache, range(0, 3), 1, 3, ids) == span
    assert region_of(cache, range(2, 3), 1, 3, ids) == span.regions[2]
    # One strided pass over the cache (consecutive blocks) or region by region: the same
    # value, and the same as for a private copy of the span.
    copy = span.private_copy()
    assert copy.cache.data_ptr() != cache.data_ptr()
    assert copy.checksum() == span.checksum()
    one = LayerSpan(cache, 0, 1, 1, 3, ids)
    assert one.checksum() == span.regions[0].checksum()
    swapped = LayerSpan(copy.cache[[1, 0, 2]], 0, 3, 0, 2, copy.block_ids)
    assert swapped.checksum() != span.checksum()

    for dst_ids in (CONTIGUOUS, RUNS, FRAGMENTED):
        dst_cache = torch.zeros(SHAPE)
        dst = LayerSpan(dst_cache, 0, 3, 0, 2, dst_ids)
        dst.copy_from(span)
        for d, s in zip(dst.regions, span.regions, strict=True):
            assert torch.equal(d.gather(), s.gather())
        assert dst.checksum() == span.checksum()
        dst_cache.zero_()
        dst.scatter(span.gather())
        assert torch.equal(dst.gather(), span.gather())
        assert dst_cache[:, :, :, :, 2:].count_nonzero() == 0  # other heads untouched
    dst.flip_byte()
    assert dst.checksum() != span.checksum()
    with pytest.raises(ValueError, match="layers"):
        dst.copy_from(one)


def test_a_layer_span_is_validated_when_built() -> None:
    cache = _cache(torch.float32)
    with pytest.raises(ValueError, match="at least one layer"):
        LayerSpan(cache, 0, 0, 0, 2, CONTIGUOUS)
    with pytest.raises(IndexError, match="layers"):
        LayerSpan(cache, SHAPE[0] - 1, 2, 0, 2, CONTIGUOUS)
    with pytest.raises(IndexError, match="heads"):
        LayerSpan(cache, 0, 2, 0, SHAPE[4] + 1, CONTIGUOUS)
    with pytest.raises(IndexError, match="block ids"):
        LayerSpan(cache, 0, 2, 0, 2, (SHAPE[2],))


@pytest.mark.usefixtures("run_rule")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("src_ids", [CONTIGUOUS, RUNS, MIXED, FRAGMENTED])
def test_copy_with_checksum_copies_and_matches_the_checksum(dtype, layers, src_ids) -> None:
    src_cache, dst_cache = _cache(dtype, 4), torch.zeros(SHAPE, dtype=dtype)
    src = region_of(src_cache, range(1, 1 + layers), 1, 3, src_ids)
    dst = region_of(dst_cache, range(0, layers), 2, 4, tuple(range(16, 24)))
    want = src.checksum()
    assert copy_into(dst, src, checksum=True) == want
    assert torch.equal(dst.gather(), src.gather())
    assert dst_cache[layers:].count_nonzero() == 0 and dst_cache[:, :, :16].count_nonzero() == 0
    assert copy_into(dst, src) is None
    with pytest.raises(ValueError, match="does not fit"):
        copy_into(region_of(dst_cache, range(0, layers), 2, 4, CONTIGUOUS[:-1]), src)


@pytest.mark.usefixtures("run_rule")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("ids", [CONTIGUOUS, RUNS, MIXED, FRAGMENTED])
def test_gather_with_checksum_matches_gather_then_checksum(dtype, layers, ids) -> None:
    """One pass per run of blocks, or a gather by index, then a sum."""
    src = region_of(_cache(dtype, 5), range(0, layers), 1, 4, ids)
    out = torch.empty(src.shape, dtype=dtype)
    assert gather_checksummed(src, out) == src.checksum()
    assert torch.equal(out, src.gather())
    with pytest.raises(ValueError, match="does not fit"):
        gather_checksummed(src, out[..., :-1])


@pytest.mark.usefixtures("run_rule")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("ids", [CONTIGUOUS, RUNS, MIXED, FRAGMENTED])
def test_scatter_with_checksum_scatters_and_matches_the_checksum(dtype, layers, ids) -> None:
    """One pass per run of blocks, or a sum, then a scatter by index: either way the
    payload lands where scatter puts it and nothing else changes."""
    payload = region_of(_cache(dtype, 6), range(0, layers), 1, 3, tuple(range(8))).gather()
    dst_cache, want_cache = _cache(dtype, 7), _cache(dtype, 7)
    dst = region_of(dst_cache, range(1, 1 + layers), 1, 3, ids)
    region_of(want_cache, range(1, 1 + layers), 1, 3, ids).scatter(payload)
    assert scatter_checksummed(dst, payload) == checksum(payload)
    assert torch.equal(dst_cache, want_cache)
    with pytest.raises(ValueError, match="does not fit"):
        scatter_checksummed(dst, payload[..., :-1])


@pytest.mark.parametrize("layers", [1, 3])
def test_message_parts_line_up_with_the_destination_parts(layers: int) -> None:
    """A payload gathered from a dense region, sent in parts, travels as the same pieces,
    in the same order, as the views it lands in (or is sent from): K then V of each
    layer. Parts of 256 KiB and up."""
    cache = torch.randn(3, 2, 24, 16, 4, 64)  # a block's K (or V): 16 KiB
    src = region_of(cache, range(0, layers), 0, 4, tuple(range(4, 20)))  # 256 KiB parts
    dst = region_of(torch.zeros_like(cache), range(0, layers), 0, 4, tuple(range(2, 18)))
    assert src.dense and splits(src) and in_parts(src, False) and in_parts(dst, False)
    pieces = message_parts(src.gather(), parts=True)
    assert [torch.equal(a, b) for a, b in zip(pieces, region_parts(src), strict=True)]
    views = region_parts(dst)
    assert len(pieces) == len(views) == 2 * layers
    for piece, view in zip(pieces, views, strict=True):
        view.copy_(piece)
    assert torch.equal(dst.gather(), src.gather())


def test_checksummed_messages_and_spans_with_small_parts_travel_whole() -> None:
    """A gathered message splits only without a checksum, and a span only when its parts
    are big. Scattered regions, and regions with only some heads, have no parts in
    place."""
    cache = torch.randn(3, 2, 24, 16, 4, 64)
    small = region_of(cache, range(0, 3), 0, 4, tuple(range(4, 19)))  # 240 KiB parts
    assert not splits(small) and not in_parts(small, False)
    one_layer = small.region(0)
    assert splits(one_layer) and in_parts(one_layer, False)  # one layer: always
    assert len(message_parts(one_layer.gather(), parts=True)) == 2  # K, V
    big = region_of(cache, range(0, 3), 0, 4, tuple(range(4, 20)))  # 256 KiB parts
    assert in_parts(big, False) and not in_parts(big, True)
    for payload in (big.gather(), one_layer.gather()):
        (whole,) = message_parts(payload, parts=False)
        assert whole is payload
    assert len(region_parts(small)) == 6  # dense: its parts lie in place, small or not
    with pytest.raises(ValueError, match="dense"):
        region_parts(region_of(cache, range(0, 1), 0, 4, FRAGMENTED))
    with pytest.raises(ValueError, match="dense"):  # some heads only: not contiguous
        region_parts(region_of(cache, range(0, 1), 1, 3, CONTIGUOUS))


@pytest.mark.parametrize("layers", [1, 3])
def test_scattered_blocks_move_in_one_native_call(
    layers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However scattered the blocks, a checksum, a checksummed gather, scatter or copy,
    and a span's plain copy, gather or scatter each make one call of the kernel."""
    calls: list[int] = []
    by_id = word_sums.by_id

    def counted(*args: object, **kwargs: object) -> torch.Tensor | None:
        calls.append(1)
        return by_id(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(word_sums, "by_id", counted)
    cache, dst_cache = _cache(torch.float32, 8), torch.zeros(SHAPE)
    src = region_of(cache, range(0, layers), 1, 3, FRAGMENTED)
    dst = region_of(dst_cache, range(0, layers), 0, 2, MIXED)
    out = torch.empty(src.shape)
    ops: list[Callable[[], object]] = [
        lambda: src.checksum(),
        lambda: gather_checksummed(src, out),
        lambda: scatter_checksummed(dst, out),
        lambda: copy_into(dst, src, checksum=True),
    ]
    if layers > 1:
        span, into = cast(LayerSpan, src), cast(LayerSpan, dst)
        ops += [
            lambda: span.gather(out=out),
            lambda: into.scatter(out),
            lambda: into.copy_from(span),
        ]
    for op in ops:
        calls.clear()
        op()
        assert len(calls) == 1
    assert torch.equal(dst.gather(), src.gather())
