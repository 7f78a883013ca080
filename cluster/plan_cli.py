"""`pdserve profile` and `pdserve plan`: measure the engine, then pick a layout.

    pdserve profile -c cluster.yaml [--out profile.json] [--quick]
    pdserve plan --profile profile.json --workload prompt-heavy|trace.csv \\
        --ttft-slo 6 --tpot-slo 0.2 --percentile 90 --budget-devices 4 [--out cluster.yaml]

`profile` measures every distinct TP/PP layout of the config's pools with the config's
model, dtype and KV transport (`planner.measure`), writes the profile JSON and a plot
next to it (`.png`). `plan` searches layouts on the simulator (`planner.search`),
prints the best ones with predicted goodput per device, and writes the best as a
cluster config: the `-c` config (or the defaults) with its pools and disaggregation
threshold replaced, loaded back with `cluster.config_file.load_config` before it is
kept, so `pdserve up -c` and `pdserve render k8s -c` accept it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.workload import MIXES, Mix
from cluster.config import ClusterConfig, ConfigError, PoolConfig
from cluster.config_file import load_config
from planner.layout import Layout, PoolShape
from planner.metrics import Slo
from planner.search import SearchResult, SearchSpace, search
from planner.simulator import simulate
from planner.workload import Workload
from registry.types import Role


def _echo(msg: str) -> None:
    print(msg, flush=True)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


# -- profile -------------------------------------------------------------------------------


def cmd_profile(args: argparse.Namespace) -> int:
    from planner.measure import ProfileSpec, measure
    from planner.plots import plot_profile

    config = load_config(args.config, list(args.set or []))
    shapes = tuple(dict.fromkeys((p.tp, p.pp) for p in config.pools))
    pool = config.generating_pool
    grid: dict[str, Any] = {}
    if args.quick:
        grid = dict(
            prefill_tokens=(64, 256, 512),
            prefill_batches=(1,),
            decode_batches=(1, 4),
            decode_contexts=(256,),
            decode_steps=3,
            repeats=1,
            transfer_tokens=(16, 512),
        )
    for name in ("prefill_tokens", "prefill_batches", "decode_batches", "decode_contexts"):
        value = getattr(args, name)
        if value:
            grid[name] = _ints(value)
    spec = ProfileSpec(
        model=config.model.source,
        dtype=config.model.dtype,
        device=pool.device,
        shapes=shapes,
        num_threads=pool.num_threads,
        block_size=config.block_size,
        transport=config.kv_transfer.transport if config.prefill_pool else None,
        **grid,
    )
    _echo(f"profiling {spec.model} ({spec.dtype}) for layouts {list(shapes)} (tp, pp)")
    profile = measure(spec)
    out = Path(args.out)
    profile.save(out)
    plot = plot_profile(profile, out.with_suffix(".png"))
    for lp in profile.layouts:
        p, d = lp.prefill, lp.decode
        _echo(
            f"tp={lp.tp} pp={lp.pp}: prefill {p.a * 1e3:.2f} ms + {p.b * 1e3:.4f} ms/token "
            f"+ {p.c * 1e6:.4f} us/token^2 (worst point {p.max_rel_error:.0%}); decode "
            f"{d.a * 1e3:.2f} ms + {d.b * 1e3:.3f} ms/seq + {d.c * 1e6:.4f} us/context token "
            f"(worst point {d.max_rel_error:.0%})"
        )
    if profile.transfer is not None:
        t = profile.transfer.fit
        _echo(f"transfer: {t.a * 1e3:.2f} ms + {t.b * 1e9:.3f} s/GB")
    _echo(f"wrote {out} and {plot}")
    return 0


# -- plan ----------------------------------------------------------------------------------


def _workload(args: argparse.Namespace, block_size: int) -> Workload:
    if args.workload in MIXES or args.prompt_len or args.output_len:
        name = args.workload if args.workload in MIXES else None
        mix = Mix.build(name, args.prompt_len, args.output_len)
        return Workload.from_mix(mix, args.prefix_hit, block_size)
    path = Path(args.workload)
    if not path.exists():
        raise ConfigError(
            f"--workload: {args.workload!r} is neither a mix ({', '.join(MIXES)}) nor a file"
        )
    return Workload.from_trace(path)


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        return _plan(args)
    except (ValueError, KeyError) as e:  # bad profile, workload, SLO or budget
        print(f"pdserve plan: {e}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    from planner.profile import Profile

    base = load_config(args.config, list(args.set or []))
    profile = Profile.load(args.profile)
    workload = _workload(args, base.block_size)
    slo = Slo(args.ttft_slo, args.tpot_slo, args.percentile)
    engine = base.generating_pool.engine
    space = SearchSpace(
        budget_devices=args.budget_devices,
        shapes=tuple(profile.shapes),
        thresholds=_ints(args.thresholds),
        devices_per_node=args.devices_per_node,
        max_batched_tokens=engine.max_num_batched_tokens,
        max_num_seqs=engine.max_num_seqs,
    )
    _echo(
        f"workload {workload.name}; SLO TTFT {slo.ttft_s:g} s, TPOT {slo.tpot_s:g} s at "
        f"P{slo.percentile:g}; budget {space.budget_devices} devices"
    )
    result = search(
        profile.cluster_model(), workload, slo, space, args.requests, args.seed, args.keep
    )
    _print_ranking(result)
    chosen = result.best
    model = profile.cluster_model()
    at = simulate(chosen.layout, model, workload.at_rate(chosen.goodput, args.requests, args.seed))
    _echo(
        f"{chosen.layout.describe()} at {chosen.goodput:.3f} req/s: TTFT p50/p90/p99 "
        f"{at.ttft_p(50):.3f}/{at.ttft_p(90):.3f}/{at.ttft_p(99):.3f} s, TPOT "
        f"{at.tpot_p(50) * 1e3:.1f}/{at.tpot_p(90) * 1e3:.1f}/{at.tpot_p(99) * 1e3:.1f} ms, "
        f"{at.attainment(slo):.0%} within both SLOs"
    )
    data = layout_config(chosen.layout, base, args.config)
    header = (
        f"# pdserve plan: {chosen.layout.describe()}, predicted goodput {chosen.goodput:.3f} "
        f"req/s ({chosen.per_device:.3f} per device) for {workload.name},\n# SLO TTFT "
        f"{slo.ttft_s:g} s and TPOT {slo.tpot_s:g} s at P{slo.percentile:g}, profile "
        f"{Path(args.profile).name}\n"
    )
    text = header + yaml.safe_dump(data, sort_keys=False)
    if args.out:
        write_config(Path(args.out), text)
        _echo(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _print_ranking(result: SearchResult) -> None:
    _echo(f"{'layout':<34} {'devices':>7} {'goodput':>9} {'per dev':>9} {'bound':>9}")
    for c in result.ranked:
        _echo(
            f"{c.layout.describe():<34} {c.layout.devices:>7} {c.goodput:>9.3f} "
            f"{c.per_device:>9.3f} {c.bound:>9.3f}"
        )
    _echo(
        f"({len(result.ranked)} simulated, {len(result.pruned)} pruned, {result.simulations} runs)"
    )


def _pool(template: PoolConfig, name: str, role: Role, shape: PoolShape) -> dict[str, Any]:
    pool: dict[str, Any] = template.model_dump(mode="json")
    pool.update(name=name, role=role.value, replicas=shape.replicas, tp=shape.tp, pp=shape.pp)
    return pool


def layout_config(layout: Layout, base: ClusterConfig, path: str | None) -> dict[str, Any]:
    """The YAML data of `base` (as written in `path`) with `layout`'s pools."""
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
    gen = base.generating_pool
    if layout.prefill is None:
        data["pools"] = [_pool(gen, "main", Role.COLOCATED, layout.generating)]
    else:
        prefill = base.prefill_pool or gen
        data["pools"] = [
            _pool(prefill, "prefill", Role.PREFILL, layout.prefill),
            _pool(gen, "decode", Role.DECODE, layout.generating),
        ]
        data.setdefault("router", {})["disaggregation_threshold"] = layout.threshold
    return data


def write_config(path: Path, text: str) -> ClusterConfig:
    """Write `text` to `path` and load it back; a config the loader rejects is removed."""
    path.write_text(text)
    try:
        return load_config(path)
    except ConfigError:
        path.unlink()
        raise


# -- parsers ----------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    prof = sub.add_parser("profile", help="measure the engine for the config's layouts")
    prof.add_argument("-c", "--config", help="cluster config YAML")
    prof.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    prof.add_argument("-o", "--out", default="profile.json", help="profile JSON (plot: .png)")
    prof.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    prof.add_argument("--prefill-tokens", help="prompt lengths, e.g. 32,128,512,1024")
    prof.add_argument("--prefill-batches", help="prompts per step, e.g. 1,2")
    prof.add_argument("--decode-batches", help="sequences per step, e.g. 1,4,16")
    prof.add_argument("--decode-contexts", help="tokens per sequence, e.g. 128,1024")
    prof.set_defaults(func=cmd_profile)

    plan = sub.add_parser("plan", help="pick a layout for a workload and SLOs")
    plan.add_argument("--profile", required=True, help="profile JSON from `pdserve profile`")
    plan.add_argument(
        "--workload", default="prompt-heavy", help=f"a mix ({', '.join(MIXES)}) or a CSV trace"
    )
    plan.add_argument("--prompt-len", help="prompt length spec, replaces the mix's")
    plan.add_argument("--output-len", help="output length spec, replaces the mix's")
    plan.add_argument("--prefix-hit", type=float, default=0.0, help="share of each prompt cached")
    plan.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    plan.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    plan.add_argument("--percentile", type=float, default=90.0, help="share meeting both SLOs")
    plan.add_argument("--budget-devices", type=int, required=True, help="devices (GPUs or CPUs)")
    plan.add_argument("--devices-per-node", type=int, help="largest replica (tp x pp)")
    plan.add_argument("--thresholds", default="0,64", help="disaggregation thresholds to try")
    plan.add_argument("--requests", type=int, default=400, help="requests per simulation")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--keep", type=int, default=5, help="layouts to rank")
    plan.add_argument("-c", "--config", help="base cluster config (everything but the pools)")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    plan.add_argument("-o", "--out", help="write the chosen cluster config here (else stdout)")
    plan.set_defaults(func=cmd_plan)
