"""Cost of admission + settlement against the size of the ledger, throughput, and exact limits.

    python benchmarks/admission.py [--requests 400] [--rows 100000,1000000] [--no-postgres]
        [--smoke]

Prints, side by side in one run:

1. one admit + settle (each in its own transaction, as a lone request pays it) with 0, 100k and
   1M ledger rows in the tenant's current budget period, on SQLite and on PostgreSQL (a
   throwaway server from ``moestack.testing.postgres``), and the ratio to the empty ledger
   (target: 1M within 1.2x of empty);
2. admit + settle per second in one gateway process on SQLite, through the store writer (group
   commit) with the auth cache in front, as the gateway runs them (target: >= 5,000/s);
3. 4 gateway processes (``--processes``) at once on PostgreSQL: admit + settle per second over
   all of them, each through its own store writer, all for one tenant (every admission locks the
   tenant's counters row: the worst case) and for a tenant each (target: >= 2,000/s); N
   concurrent requests against a budget worth K requests admit K and spend no more than K, and
   a requests-per-minute limit admits exactly its limit.

Steps 2 and 3 also print the CPU milliseconds per admit + settle of the measuring processes (the
machine's other load lowers the rates; the CPU cost is what caps them).

Rows are seeded with one ``INSERT ... SELECT`` (a recursive CTE on SQLite, ``generate_series``
on PostgreSQL). Sized for 2 cores: a few minutes. ``--smoke``: every step at the smallest size
(a thousand rows, two gateway processes), in seconds, as the test suite runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from moestack.errors import RateLimitError
from moestack.tenancy import admission, ledger
from moestack.tenancy.admission import Admission, Reservation
from moestack.tenancy.auth_cache import AuthCache
from moestack.tenancy.ledger import Settlement
from moestack.tenancy.store import TenancyStore
from moestack.tenancy.writer import StoreWriter
from moestack.usage import RequestRecord
from moestack.testing.benchmark_args import parse_with_smoke

LIMITS = {"budget_usd": 1e9, "budget_period": "month", "requests_per_min": 10**8,
          "tokens_per_min": 2*10**9, "max_concurrent_requests": 10**6}
"""Every limit set (so every check runs), none ever reached."""
SMOKE = {"requests": 8, "rows": "1000", "throughput_requests": 100, "concurrency": 8,
         "processes": 2}
"""``--smoke``: every step once at the smallest size that still runs it."""


def record(rid: str) -> RequestRecord:
    return RequestRecord(request_id=rid, model="m", endpoint="chat.completions", stream=True,
                         status_code=200, prompt_tokens=12, completion_tokens=30,
                         cached_prompt_tokens=0, ttft_s=0.01, e2e_s=0.2)


def seed(store: TenancyStore, tenant_id: int, upto: int, have: int) -> None:
    """Add settled ledger rows of the tenant, started this month, until it has ``upto``."""
    cols = ("request_id, tenant_id, key_id, model, endpoint, stream, state, status_code, "
            "prompt_tokens, cached_prompt_tokens, completion_tokens, reserved_tokens, "
            "reserved_usd, charged_tokens, charged_usd, started_at, gateway_id")
    if store.dialect == "postgresql":
        sql = (f"INSERT INTO usage_ledger ({cols}) SELECT 'seed-' || g, :t, 'k', 'm', "
               "'chat.completions', true, 'settled', 200, 12, 0, 30, 60, 0.0001, 42, 0.00005, "
               "date_trunc('month', now() at time zone 'utc') + (g % 86400) * interval '1 second',"
               " 'seed' FROM generate_series(:a, :b) AS g")
    else:
        sql = (f"WITH RECURSIVE c(g) AS (SELECT :a UNION ALL SELECT g + 1 FROM c WHERE g < :b) "
               f"INSERT INTO usage_ledger ({cols}) SELECT 'seed-' || g, :t, 'k', 'm', "
               "'chat.completions', 1, 'settled', 200, 12, 0, 30, 60, 0.0001, 42, 0.00005, "
               "strftime('%Y-%m-01 00:00:00.000000', 'now'), 'seed' FROM c")
    step = 200_000
    for a in range(have, upto, step):
        b = min(a + step, upto) - 1
        with store.begin() as conn:
            conn.execute(text(sql), {"t": tenant_id, "a": a, "b": b})
        print(f"    seeded {b + 1:>9,} rows", flush=True)
    if store.dialect == "postgresql":
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "ANALYZE usage_ledger")


def time_admit_settle(store: TenancyStore, principal, n: int, tag: str) -> float:
    """Median ms of one admit + one settle, each its own transaction."""
    times = []
    for i in range(n):
        rid = f"{tag}-{i}"
        t0 = time.perf_counter()
        admission.admit(store, principal, reservation=Reservation(rid, 60, 0.0001), model="m",
                        endpoint="chat.completions", stream=True, gateway_id="bench",
                        lease_s=60)
        ledger.settle(store, record(rid), charged_usd=0.00005, cost_usd=0.00001,
                      baseline_costs_usd={"gpt": 0.0002, "claude": 0.0003})
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def scaling(make_url, sizes: list[int], n: int, label: str, rounds: int = 8) -> dict[int, float]:
    """One database per ledger size, measured in interleaved rounds (so drift in the machine's
    load hits every size alike); returns the median ms per size."""
    dbs = {}
    for size in [0, *sizes]:
        store = TenancyStore.open(make_url(f"scale{size}"))
        _, key = store.create_tenant("big", **LIMITS)
        p = admission.authenticate(store, key.plaintext)
        if size:
            seed(store, p.tenant_id, size, 0)
        time_admit_settle(store, p, 20, "warm")
        dbs[size] = (store, p, [])
    for r in range(rounds):
        for size, (store, p, times) in dbs.items():
            times.append(time_admit_settle(store, p, n // rounds, f"r{r}"))
    out = {}
    for size, (store, _, times) in dbs.items():
        out[size] = statistics.median(times)
        print(f"  {label:10} {size:>9,} rows: {out[size]:.3f} ms per admit + settle "
              f"(rounds: {', '.join(f'{t:.3f}' for t in times)})", flush=True)
        store.close()
    return out


async def throughput(url: str, total: int, concurrency: int, key: str | None = None,
                     barrier=None) -> tuple[float, int, float]:
    """admit + settle per second through the writer, with the auth cache in front; also the
    rows settled (of the whole store) and the CPU ms of this process per admit + settle.
    With ``key``, the tenant exists (another process made it) and ``barrier`` starts the
    processes together."""
    store = TenancyStore.open(url, migrate=key is None)
    if key is None:
        key = store.create_tenant("fast", **LIMITS)[1].plaintext
    writer = StoreWriter(store, flush_interval_s=0.02, max_batch=500)
    auth = AuthCache(store, ttl_s=2.0)
    tag = multiprocessing.current_process().name
    loop = asyncio.get_running_loop()
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        p = await auth.principal(key)
        rid = f"{tag}-t-{i}"
        await writer.submit_batched(admission.admit_many, Admission(
            p, Reservation(rid, 60, 0.0001), "m", "chat.completions", True, "bench", 60),
            p.tenant_id, deferred=False, loop=loop)
        s = Settlement(record(rid), 0.00005, 0.00001, {"gpt": 0.0002, "claude": 0.0003})
        writer.submit_batched(ledger.settle_many, s, p.tenant_id)
        done += 1

    async def worker(k: int) -> None:
        for i in range(k, total, concurrency):
            await one(i)

    await auth.principal(key)  # the key's first lookup is not part of the rate
    if barrier is not None:
        await asyncio.to_thread(barrier.wait)
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    await asyncio.to_thread(writer.flush, 30)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    writer.stop()
    with store.read() as conn:
        settled = conn.exec_driver_sql(
            "SELECT count(*) FROM usage_ledger WHERE state = 'settled'").scalar()
    store.close()
    return total / elapsed, settled, cpu * 1000 / total


def _throughput_process(url: str, key: str, total: int, concurrency: int, barrier, out) -> None:
    t0 = time.time()
    rate, _, cpu_ms = asyncio.run(throughput(url, total, concurrency, key, barrier))
    out.put((total, time.time() - total / rate, time.time(), cpu_ms, t0))


def throughput_processes(url: str, processes: int, per_process: int, concurrency: int,
                         shared: bool = True) -> tuple[float, int, float]:
    """admit + settle per second over ``processes`` gateway processes on one store (first start
    to last finish), the rows settled, and the mean CPU ms per admit + settle per process. With
    ``shared`` every process admits for the same tenant (whose counters row every admission
    locks: the worst case); else each for a tenant of its own."""
    store = TenancyStore.open(url)
    keys = [store.create_tenant(f"fast{i}", **LIMITS)[1].plaintext
            for i in range(1 if shared else processes)]
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_throughput_process, name=f"gw{i}",
                         args=(url, keys[i % len(keys)], per_process, concurrency, barrier,
                               out))
             for i in range(processes)]
    for pr in procs:
        pr.start()
    results = [out.get(timeout=600) for _ in procs]
    for pr in procs:
        pr.join(60)
    with store.read() as conn:
        settled = conn.exec_driver_sql(
            "SELECT count(*) FROM usage_ledger WHERE state = 'settled'").scalar()
    store.close()
    start, end = min(r[1] for r in results), max(r[2] for r in results)
    return (sum(r[0] for r in results) / (end - start), settled,
            statistics.mean(r[3] for r in results))


def _gateway_process(url: str, key: str, count: int, usd: float, barrier, out) -> None:
    async def main():
        store = TenancyStore.open(url, migrate=False)
        writer = StoreWriter(store)
        p = admission.authenticate(store, key)
        tag = multiprocessing.current_process().name

        async def one(i: int) -> str:
            rid = f"{tag}-{i}"
            try:
                await asyncio.wrap_future(writer.submit_batched(
                    admission.admit_many, Admission(p, Reservation(rid, 10, usd), "m",
                                                    "chat.completions", True, tag, 60),
                    p.tenant_id, deferred=False))
            except RateLimitError:
                return "refused"
            s = Settlement(record(rid), usd)  # a real cost equal to its upper bound
            await asyncio.wrap_future(writer.submit_batched(ledger.settle_many, s, p.tenant_id))
            return "ok"
        barrier.wait()
        results = await asyncio.gather(*(one(i) for i in range(count)))
        writer.stop()
        store.close()
        out.put(results.count("ok"))
    asyncio.run(main())


def exact_limits(url: str, processes: int, per_process: int) -> dict[str, tuple]:
    store = TenancyStore.open(url)
    usd, k = 0.01, 37
    _, budget_key = store.create_tenant("budget", budget_usd=usd * k)
    _, rpm_key = store.create_tenant("rpm", requests_per_min=50)
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name, key, cost in (("budget", budget_key, usd), ("rpm", rpm_key, 0.0)):
        barrier, out = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=_gateway_process, name=f"gw{i}-{name}",
                             args=(url, key.plaintext, per_process, cost, barrier, out))
                 for i in range(processes)]
        for pr in procs:
            pr.start()
        admitted = sum(out.get(timeout=300) for _ in procs)
        for pr in procs:
            pr.join(60)
        rows = ledger.query_usage(store, tenant=name)
        spent = sum(r.charged_usd for r in rows)
        results[name] = (processes * per_process, admitted, len(rows), spent)
    store.close()
    results["budget_k"] = (k, usd * k)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="timed admit+settle per size")
    ap.add_argument("--rows", default="100000,1000000", help="ledger sizes, comma separated")
    ap.add_argument("--throughput-requests", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--processes", type=int, default=4, help="gateway processes of step 3")
    ap.add_argument("--no-postgres", action="store_true")
    args = parse_with_smoke(ap, argv, SMOKE)
    sizes = [int(x) for x in args.rows.split(",") if x]
    tmp = Path(tempfile.mkdtemp(prefix="moestack-admission-"))
    backends = {"sqlite": lambda name: f"sqlite:///{tmp / name}.db"}
    pg = None
    if not args.no_postgres:
        from moestack.testing.postgres import PostgresServer, PostgresUnavailable
        try:
            pg = PostgresServer(tmp).start()
            backends["postgresql"] = pg.create_database
        except PostgresUnavailable as exc:
            print(f"PostgreSQL skipped: {exc}")
    try:
        print("1. one admit + settle vs ledger rows in the current period (median)", flush=True)
        scale = {b: scaling(make, sizes, args.requests, b) for b, make in backends.items()}
        print("2. throughput in one gateway process (SQLite, writer + auth cache)", flush=True)
        rate, settled, cpu_ms = asyncio.run(throughput(
            backends["sqlite"]("rate"), args.throughput_requests, args.concurrency))
        limits = pg_rate = None
        if "postgresql" in backends:
            print(f"3. throughput and exact limits with {args.processes} gateway processes on "
                  "PostgreSQL", flush=True)
            pg_rate = [throughput_processes(
                backends["postgresql"](f"rate{shared}"), args.processes,
                args.throughput_requests // args.processes, args.concurrency, shared)
                for shared in (True, False)]
            limits = exact_limits(backends["postgresql"]("limits"), args.processes, 40)
    finally:
        if pg is not None:
            pg.stop()
    print("\n== admit + settle, ms (median of %d, interleaved rounds) ==" % args.requests)
    names = list(scale)
    print(f"{'ledger rows':>12} " + " ".join(f"{b:>12} {'x empty':>8}" for b in names))
    for size in [0, *sizes]:
        cells = " ".join(f"{scale[b][size]:>12.3f} {scale[b][size] / scale[b][0]:>8.2f}"
                         for b in names)
        print(f"{size:>12,} {cells}")
    worst = max(scale[b][sizes[-1]] / scale[b][0] for b in names) if sizes else 1.0
    print(f"largest ledger vs empty: {worst:.2f}x (target <= 1.2x): "
          f"{'met' if worst <= 1.2 else 'NOT met'}")
    print(f"\n== one gateway process, SQLite: {rate:,.0f} admit + settle per second "
          f"({args.throughput_requests} requests, {args.concurrency} concurrent, {settled} "
          f"settled; {cpu_ms:.3f} ms CPU each) (target >= 5,000/s): "
          f"{'met' if rate >= 5000 else 'NOT met'}")
    for (prate, psettled, pcpu), tenants in zip(pg_rate or (), ("one tenant", "a tenant each")):
        n = args.throughput_requests // args.processes * args.processes
        print(f"== {args.processes} gateway processes, PostgreSQL, {tenants}: {prate:,.0f} admit "
              f"+ settle per second ({n} requests, {args.concurrency} concurrent per process, "
              f"{psettled} settled; {pcpu:.3f} ms CPU each per process) (target >= 2,000/s): "
              f"{'met' if prate >= 2000 else 'NOT met'}")
    if limits:
        n, admitted, rows, spent = limits["budget"]
        k, worth = limits["budget_k"]
        exact = admitted == k and spent <= worth + 1e-9
        print(f"\n== {args.processes} gateway processes, PostgreSQL ==\nbudget worth {k} "
              f"requests ({worth:.2f} USD): {n} concurrent requests, {admitted} admitted, {rows} "
              f"rows, {spent:.6f} USD spent: {'exact' if exact else 'WRONG'}")
        n, admitted, rows, _ = limits["rpm"]
        print(f"requests_per_min 50: {n} concurrent requests, {admitted} admitted, {rows} rows: "
              f"{'exact' if admitted == rows == 50 else 'WRONG'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
