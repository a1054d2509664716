"""Cost-aware overflow under a burst: three setups side by side, in one run, on the same gateway
(fair queue, tenancy, ledger in SQLite) over the fake engine with ``--slots`` batch slots, and a
fake OpenAI-compatible provider on loopback (``moestack.testing.fake_providers``):

* ``no-overflow``: the cluster alone; every request waits for a slot;
* ``overflow``: the opted-in tenant (``burst``) overflows to the provider when its predicted
  wait in the fair queue is over ``--bound-ms``; the other tenant (``steady``, policy ``never``)
  never does;
* ``all-api``: everything to the API (no replica: every request overflows).

The gateway (``python -m moestack.testing.gateway_server``) and the provider
(``python -m moestack.testing.fake_providers``) run in processes of their own, apart from the
load generator. ``no-overflow`` and ``overflow`` run one after the other on one gateway (their
tenants' policies differ: ``never`` or ``allowed``), ``all-api`` on a second one with every
engine down.

The load: open-loop Poisson arrivals for ``--burst-s`` seconds at ``--overload`` times the
cluster's capacity (slots / hold time of one request), ``--steady-share`` of it from ``steady``,
the rest from ``burst``. Figures per setup: each tenant's TTFT p50/p95 (streamed: the first
content event, queueing included), requests lost (no complete 200 answer; target 0), the share
of requests the provider answered (from the ledger), and the USD of the burst: the provider's
bill (ledger ``cost_usd`` of provider rows, the provider's tokens at its prices) plus the
cluster's provisioned cost over the run (one replica at ``--replica-usd-per-hour``, default one
H100 of the pricing catalog; 0 for ``all-api``, which needs no cluster).

    .venv/bin/python benchmarks/overflow.py              # 30 s burst per setup (~3 min)
    .venv/bin/python benchmarks/overflow.py --smoke      # seconds
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from moestack.metering.pricing import load_pricing
from moestack.plotting import pyplot, save_figure
from moestack.tenancy import ledger
from moestack.tenancy.store import TenancyStore
from moestack.net import free_port
from moestack.testing.benchmark_args import parse_with_smoke

MODEL = "fake-moe"
KEY_ENV = "MOESTACK_BENCH_OVERFLOW_PROVIDER_KEY"
SETUPS = ("no-overflow", "overflow", "all-api")


@dataclass
class Result:
    tenant: str
    ttft_s: float | None
    ok: bool
    why: str = ""
    """Why it was lost: the status, or the client's exception."""


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def fmt(v: float | None, scale: float = 1000.0) -> str:
    return "-" if v is None else f"{v * scale:.0f}"


async def one_request(http: httpx.AsyncClient, key: str, tenant: str, max_tokens: int,
                      results: list[Result]) -> None:
    started = time.monotonic()
    ttft, done, why = None, False, ""
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": True,
            "messages": [{"role": "user", "content": "tell me about overflow " + tenant}]}
    try:
        async with http.stream("POST", "chat/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as resp:
            why = str(resp.status_code)
            if resp.status_code != 200:
                await resp.aread()
                why += " " + resp.text[:120]
            else:
                async for line in resp.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif ttft is None and line.startswith("data:") and '"content"' in line:
                        ttft = time.monotonic() - started
    except httpx.HTTPError as exc:
        done, why = False, type(exc).__name__
    results.append(Result(tenant, ttft, done, "" if done else why))


async def drive(base_url: str, keys: dict[str, str], rates: dict[str, float], burst_s: float,
                max_tokens: int, seed: int) -> tuple[list[Result], float]:
    results: list[Result] = []
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=4000)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        started = time.monotonic()
        arrivals = sorted((t, tenant) for tenant, rate in rates.items()
                          for t in _poisson(rng, rate, burst_s))
        tasks = []
        for at, tenant in arrivals:
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(http, keys[tenant], tenant,
                                                         max_tokens, results)))
        await asyncio.gather(*tasks)
        return results, time.monotonic() - started


def _poisson(rng: random.Random, rate: float, horizon_s: float) -> list[float]:
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= horizon_s:
            return out
        out.append(t)


def settled_rows(db_url: str, tenants: tuple[str, ...], expected: int,
                 timeout_s: float = 30.0) -> list:
    """The ledger rows of ``tenants`` once ``expected`` of them are there and none pending."""
    deadline = time.monotonic() + timeout_s
    while True:
        store = TenancyStore.open(db_url, migrate=False)
        try:
            rows = [r for r in ledger.query_usage(store) if r.tenant in tenants]
        finally:
            store.close()
        if (len(rows) >= expected and all(r.state != "pending" for r in rows)) or \
                time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


@contextmanager
def gateway(args, provider_url: str, workdir: Path, engines_down: bool):
    """The gateway in a process of its own, the overflow rule configured (whether a request
    overflows is its tenant's policy); ``engines_down``: no replica takes a request, so every
    request of a tenant that may overflow does. Yields (API base URL, ledger URL)."""
    name = "api" if engines_down else "cluster"
    db_url = f"sqlite:///{workdir / (name + '.db')}"
    TenancyStore.open(db_url).close()  # the ledger, migrated, before the gateway opens it
    config = dict(
        models=[{"name": MODEL, "engine": "fake", "max_model_len": 4096,
                 "fake": {"ttft_s": args.engine_ttft_s, "token_interval_s": args.token_interval_s,
                          "max_num_seqs": args.slots}}],
        storage={"url": db_url},
        tenancy={"enabled": True, "bootstrap_tenant": None, "auth_cache_ttl_s": 5.0,
                 "fair_queue": {"max_inflight_requests_per_model": args.slots}},
        overflow={"providers": [{"name": "api", "kind": "openai", "base_url": provider_url,
                                 "api_key_env": KEY_ENV, "model": args.provider_model,
                                 "max_concurrency": 4096}],
                  "rules": [{"model": MODEL, "provider": "api",
                             "max_queue_wait_ms": args.bound_ms}]})
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    with process([sys.executable, "-m", "moestack.testing.gateway_server", "--port", str(port),
                  "--config", str(path)] + (["--engines-down"] if engines_down else []),
                 f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}/v1", db_url


def run_setup(setup: str, args, base_url: str, db_url: str) -> dict:
    policies = {"no-overflow": ("never", "never"), "overflow": ("allowed", "never"),
                "all-api": ("allowed", "allowed")}[setup]
    store = TenancyStore.open(db_url, migrate=False)
    keys, names = {}, {}
    for tenant, policy in zip(("burst", "steady"), policies):
        names[tenant] = f"{setup}-{tenant}"
        _, key = store.create_tenant(names[tenant], allowed_models=["*"], requests_per_min=None,
                                     max_concurrent_requests=None, overflow_policy=policy,
                                     overflow_budget_usd=1000.0)
        keys[tenant] = key.plaintext
    store.close()
    hold_s = args.engine_ttft_s + args.token_interval_s * args.max_tokens
    capacity = args.slots / hold_s
    total = capacity * args.overload
    rates = {"steady": total * args.steady_share, "burst": total * (1 - args.steady_share)}
    results, wall_s = asyncio.run(drive(base_url, keys, rates, args.burst_s, args.max_tokens,
                                        args.seed))
    rows = settled_rows(db_url, tuple(names.values()), len(results))
    provider_rows = [r for r in rows if r.backend.startswith("provider:")]
    provider_usd = sum(r.cost_usd or 0.0 for r in provider_rows)
    cluster_usd = 0.0 if setup == "all-api" else args.replica_usd_per_hour * wall_s / 3600
    ttft = {t: [r.ttft_s for r in results if r.tenant == t and r.ttft_s is not None]
            for t in ("burst", "steady")}
    return {"setup": setup, "requests": len(results), "wall_s": wall_s,
            "lost": sum(not r.ok for r in results), "rows": len(rows),
            "share": len(provider_rows) / max(1, len(rows)),
            "burst_p50": pct(ttft["burst"], 0.5), "burst_p95": pct(ttft["burst"], 0.95),
            "steady_p50": pct(ttft["steady"], 0.5), "steady_p95": pct(ttft["steady"], 0.95),
            "provider_usd": provider_usd, "cluster_usd": cluster_usd,
            "usd": provider_usd + cluster_usd, "capacity": capacity, "rates": rates,
            "lost_why": Counter(r.why for r in results if not r.ok)}


@contextmanager
def process(cmd: list[str], ready_url: str):
    """Run ``cmd`` until the block ends (SIGTERM, then SIGKILL); ready once ``ready_url``
    answers at all."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}")
            try:
                httpx.get(ready_url, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=8, help="fake engine batch slots")
    p.add_argument("--burst-s", type=float, default=30.0, help="burst length, seconds")
    p.add_argument("--overload", type=float, default=3.0, help="arrival rate / capacity")
    p.add_argument("--steady-share", type=float, default=0.1,
                   help="share of the arrivals from the tenant that never overflows")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--token-interval-s", type=float, default=0.1)
    p.add_argument("--engine-ttft-s", type=float, default=0.02)
    p.add_argument("--provider-ttft-s", type=float, default=0.25,
                   help="the fake provider's time to first token")
    p.add_argument("--provider-token-interval-s", type=float, default=0.02)
    p.add_argument("--bound-ms", type=float, default=500.0,
                   help="the opted-in tenant's max_queue_wait_ms")
    p.add_argument("--provider-model", default="gpt-5.4",
                   help="provider model id (priced as the pricing catalog's baseline)")
    p.add_argument("--replica-usd-per-hour", type=float,
                   default=load_pricing().usd_per_gpu_hour("H100"),
                   help="what the replica costs per hour (default: one H100 in the catalog)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("overflow.png"), help="plot file")
    args = parse_with_smoke(p, argv, {"burst_s": 2.0, "slots": 4, "overload": 2.0,
                                      "max_tokens": 6, "token_interval_s": 0.1,
                                      "provider_ttft_s": 0.05,
                                      "out": Path(tempfile.gettempdir()) / "overflow-smoke.png"})
    os.environ[KEY_ENV] = "sk-bench-provider-key"
    out = []
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, process(
            [sys.executable, "-m", "moestack.testing.fake_providers", "--port", str(port),
             "--api-key-env", KEY_ENV, "--ttft-s", str(args.provider_ttft_s),
             "--token-interval-s", str(args.provider_token_interval_s)],
            f"http://127.0.0.1:{port}/"):
        provider_url = f"http://127.0.0.1:{port}/v1"
        with gateway(args, provider_url, Path(tmp), engines_down=False) as (url, db):
            out += [run_setup(setup, args, url, db) for setup in SETUPS[:2]]
        with gateway(args, provider_url, Path(tmp), engines_down=True) as (url, db):
            out.append(run_setup(SETUPS[2], args, url, db))
    first = out[0]
    print(f"fake engine: {args.slots} slots, {first['capacity']:.1f} req/s capacity; burst "
          f"{args.burst_s:g} s at {args.overload:g}x: steady {first['rates']['steady']:.1f} "
          f"req/s, burst {first['rates']['burst']:.1f} req/s; bound {args.bound_ms:g} ms; "
          f"provider {args.provider_model}")
    print(f"{'setup':<12} {'requests':>8} {'lost':>5} {'overflow':>8} {'burst p50':>9} "
          f"{'burst p95':>9} {'steady p50':>10} {'steady p95':>10} {'API USD':>9} "
          f"{'cluster USD':>11} {'USD':>9} {'wall s':>7}")
    for r in out:
        print(f"{r['setup']:<12} {r['requests']:>8} {r['lost']:>5} {r['share']:>8.2f} "
              f"{fmt(r['burst_p50']):>9} {fmt(r['burst_p95']):>9} {fmt(r['steady_p50']):>10} "
              f"{fmt(r['steady_p95']):>10} {r['provider_usd']:>9.4f} {r['cluster_usd']:>11.4f} "
              f"{r['usd']:>9.4f} {r['wall_s']:>7.1f}")
    by = {r["setup"]: r for r in out}
    o, n = by["overflow"], by["no-overflow"]
    print(f"opted-in tenant TTFT p95 with overflow: {fmt(o['burst_p95'])} ms vs bound "
          f"{args.bound_ms:g} ms + provider TTFT {args.provider_ttft_s * 1000:g} ms "
          f"({fmt(n['burst_p95'])} ms without overflow)")
    print(f"USD of the burst: overflow / all-api {o['usd'] / max(by['all-api']['usd'], 1e-12):.2f}"
          f"x, overflow / no-overflow {o['usd'] / max(n['usd'], 1e-12):.2f}x")
    for r in out:
        if r["lost_why"]:
            print(f"lost in {r['setup']}: " + "; ".join(
                f"{n} x {why}" for why, n in r["lost_why"].most_common()))
    print("ledger rows = requests: " + ", ".join(
        f"{r['setup']} {r['rows']}/{r['requests']}" for r in out))
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(out))
    w = 0.2
    for i, (key, label) in enumerate((("burst_p50", "opted-in p50"), ("burst_p95", "opted-in p95"),
                                      ("steady_p50", "other p50"), ("steady_p95", "other p95"))):
        ax1.bar([j + (i - 1.5) * w for j in x], [(r[key] or 0) * 1000 for r in out], w,
                label=label)
    ax1.axhline(args.bound_ms + args.provider_ttft_s * 1000, color="k", ls="--",
                label="bound + provider TTFT")
    ax1.set_yscale("log")
    ax1.set_xticks(list(x), [r["setup"] for r in out])
    ax1.set_ylabel("TTFT, ms (log)")
    ax1.legend(fontsize=8)
    ax2.bar(x, [r["cluster_usd"] for r in out], label="cluster")
    ax2.bar(x, [r["provider_usd"] for r in out], bottom=[r["cluster_usd"] for r in out],
            label="API")
    for j, r in zip(x, out):
        ax2.text(j, r["usd"], f"{r['share']:.0%} to API", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(list(x), [r["setup"] for r in out])
    ax2.set_ylabel("USD of the burst")
    ax2.legend(fontsize=8)
    print(f"plot: {save_figure(fig, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
