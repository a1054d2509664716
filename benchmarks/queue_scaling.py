"""Autoscaling on the gateway's fair-queue depth, on and off, under the same burst.

Each replica of a fake-engine model takes ``--per-replica`` requests at once, so the gateway hands
Ray Serve at most that many per replica and keeps the rest of a burst in its tenant fair queue.
With ``autoscaling.count_gateway_queue`` off, the autoscaler sees only what Serve holds (about one
replica's target) and the burst drains through the replicas it started with; on, the queue depth
is load and the model scales up, and the gateway's dispatch slots follow the new replicas.

Both variants run on one Ray cluster, one after the other, with the same burst. Printed: time to
drain the burst, end-to-end latency percentiles, peak replicas and replica-seconds used, and the
ratios on/off; a PNG plots replicas and queued requests over time.

    .venv/bin/python benchmarks/queue_scaling.py [--requests 32] [--max-replicas 4] [--out DIR]
        [--smoke]

``--smoke`` (the test suite's run): both variants with a burst of a few short requests, too short
for the autoscaler to act; the figures show the script runs, not the scaling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from moestack.testing.benchmark_args import parse_with_smoke

MODEL = "fake-moe"
SMOKE = {"requests": 4, "max_replicas": 2, "per_replica": 1, "max_tokens": 8,
         "token_interval_s": 0.02}
"""``--smoke``: the smallest burst that runs both variants end to end."""


@dataclass
class Run:
    name: str
    e2e_s: list[float] = field(default_factory=list)
    drain_s: float = 0.0
    trace: list[tuple[float, int, float]] = field(default_factory=list)
    """(seconds since the burst, running replicas, requests waiting at the gateway)"""

    def replica_seconds(self) -> float:
        return sum((b[0] - a[0]) * a[1] for a, b in zip(self.trace, self.trace[1:]))


def config(args, db_url: str, count_queue: bool, operator_port: int):
    from moestack.testing import fake_config, fake_model

    return fake_config(
        fake_model(MODEL, cpus_per_worker=0.1, max_model_len=4096,
                   max_ongoing_requests=args.per_replica,
                   fake={"token_interval_s": args.token_interval_s},
                   autoscaling={"enabled": True, "min_replicas": 1,
                                "max_replicas": args.max_replicas,
                                "target_ongoing_requests": args.per_replica,
                                "count_gateway_queue": count_queue,
                                "look_back_period_s": 2, "downscale_delay_s": 600}),
        storage={"url": db_url}, tenancy={"enabled": True, "bootstrap_tenant": None},
        gateway={"operator_port": operator_port})


async def burst(args, run: Run, base: str, api_key: str, serve, operator: str) -> None:
    import httpx
    from openai import AsyncOpenAI
    from prometheus_client.parser import text_string_to_metric_families

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=600)
    start = time.monotonic()

    async def one(i: int) -> None:
        t0 = time.monotonic()
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=args.max_tokens)
        run.e2e_s.append(time.monotonic() - t0)

    tasks = [asyncio.create_task(one(i)) for i in range(args.requests)]
    async with httpx.AsyncClient(timeout=10) as http:
        while not all(t.done() for t in tasks):
            status = await asyncio.to_thread(serve.status)
            dep = status.applications[run.name].deployments[f"ModelServer:{MODEL}"]
            text = (await http.get(f"{operator}/metrics")).text  # the gateway's own port
            queued = sum(s.value for f in text_string_to_metric_families(text)
                         for s in f.samples if s.name == "moestack_queue_depth_requests")
            now = time.monotonic() - start
            run.trace.append((now, dep.replica_states.get("RUNNING", 0), queued))
            print(f"  [{run.name}] {now:5.1f} s  replicas {run.trace[-1][1]}  "
                  f"waiting at gateway {queued:3.0f}  done {len(run.e2e_s)}/{args.requests}",
                  flush=True)
            await asyncio.sleep(1.0)
    await asyncio.gather(*tasks)
    run.drain_s = time.monotonic() - start
    run.trace.append((run.drain_s, run.trace[-1][1], 0.0))
    await client.close()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def plot(runs: list[Run], path: Path) -> None:
    from moestack.plotting import pyplot, save_figure

    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(8, 6), sharex=True)
    for run in runs:
        t = [p[0] for p in run.trace]
        top.step(t, [p[1] for p in run.trace], where="post", label=run.name)
        bottom.plot(t, [p[2] for p in run.trace], label=run.name)
    top.set_ylabel("running replicas")
    bottom.set_ylabel("waiting at the gateway")
    bottom.set_xlabel("seconds since the burst")
    top.legend()
    top.set_title("Autoscaling with and without the gateway queue depth")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--per-replica", type=int, default=2,
                        help="max_ongoing_requests and target_ongoing_requests of a replica")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--token-interval-s", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "moestack-bench")
    args = parse_with_smoke(parser, argv, SMOKE)

    # Serve's autoscaling signals every 0.5 s instead of 10 s, for a short benchmark.
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    import ray
    from ray import serve

    from moestack.serve.app import build_app
    from moestack.tenancy.store import TenancyStore
    from moestack.testing.stack_process import free_port, short_temp_dir

    tmp = short_temp_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    print("starting Ray", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp),
             logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    db_url = f"sqlite:///{tmp}/tenancy.db"
    store = TenancyStore.open(db_url)
    _, key = store.create_tenant("bench")
    store.close()
    runs = []
    try:
        for name, count_queue in (("queue-off", False), ("queue-on", True)):
            print(f"deploying {name}", flush=True)
            operator_port = free_port()
            serve.run(build_app(config(args, db_url, count_queue, operator_port)), name=name,
                      route_prefix=f"/{name}")
            run = Run(name)
            asyncio.run(burst(args, run, f"http://127.0.0.1:{port}/{name}", key.plaintext,
                              serve, f"http://127.0.0.1:{operator_port}"))
            runs.append(run)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()

    off, on = runs
    print(f"\n{args.requests} requests x {args.max_tokens} tokens at "
          f"{args.token_interval_s * 1e3:.0f} ms/token; {args.per_replica} per replica, "
          f"1 to {args.max_replicas} replicas")
    print(f"{'variant':<10} {'drain s':>8} {'e2e p50 s':>10} {'e2e p95 s':>10} "
          f"{'peak replicas':>14} {'replica-s':>10}")
    for run in runs:
        print(f"{run.name:<10} {run.drain_s:8.1f} {pct(run.e2e_s, 50):10.1f} "
              f"{pct(run.e2e_s, 95):10.1f} {max(p[1] for p in run.trace):14d} "
              f"{run.replica_seconds():10.1f}")
    print(f"on/off: drain {on.drain_s / off.drain_s:.2f}x, e2e p95 "
          f"{pct(on.e2e_s, 95) / pct(off.e2e_s, 95):.2f}x, replica-seconds "
          f"{on.replica_seconds() / off.replica_seconds():.2f}x")
    png = args.out / "queue_scaling.png"
    plot(runs, png)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
