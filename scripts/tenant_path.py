"""The path of a tenant's identity through the gateway, from HTTP request to ledger row.

    python scripts/tenant_path.py [-v]

Serves one streamed chat request of a tenant in-process (fake engine, SQLite), with a profiler
that records every call into moestack code whose arguments hold the tenant's identity: its API
key, its tenant id or name, or an object that carries one of them (a principal, a ticket, a
request context: looked up three attributes deep). Prints those hops in call order, how many
there are, over how many files and rooms, and how often the path crosses from one room to
another (a function counts once, however often it is called). ``-v`` lists the hops. Run it from a checkout to compare two versions of the code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

PACKAGE_MARK = f"{Path('moestack')}"


def _holds(value, needles: tuple[str, ...], depth: int = 3) -> bool:
    if isinstance(value, str):
        return value in needles
    if isinstance(value, bytes):
        return any(n.encode() in value for n in needles)
    if depth == 0 or value is None or isinstance(value, (int, float, bool)):
        return False
    if type(value).__module__.startswith("starlette") and hasattr(value, "headers"):
        return any(_holds(v, needles, 0) for v in value.headers.values())
    if isinstance(value, dict):
        return any(_holds(v, needles, depth - 1) for v in list(value.values())[:32])
    if isinstance(value, (list, tuple)):
        return any(_holds(v, needles, depth - 1) for v in value[:8])
    attrs = getattr(value, "__dict__", None)
    if attrs is None and hasattr(value, "__slots__"):
        attrs = {s: getattr(value, s, None) for s in value.__slots__}
    if not isinstance(attrs, dict) or type(value).__module__.split(".")[0] != "moestack":
        return False
    return any(_holds(v, needles, depth - 1) for v in list(attrs.values())[:32])


async def _run(verbose: bool) -> None:
    from moestack.testing import fake_config, fake_model
    from moestack.testing.local_api import local_stack

    tmp = Path(tempfile.mkdtemp(prefix="tenant-path."))
    config = fake_config(fake_model("fake-moe"), storage={"url": f"sqlite:///{tmp}/t.db"},
                         tenancy={"enabled": True, "auth_cache_ttl_s": 0})
    async with local_stack(config) as stack:
        _, new_key = stack.tenancy.store.create_tenant("acme")
        key = new_key.plaintext
        needles = (key, new_key.key_id, "acme")
        client = stack.openai(api_key=key)
        hops: list[tuple[str, str]] = []

        def profile(frame, event, arg):
            if event != "call":
                return
            path = frame.f_code.co_filename
            if "/moestack/" not in path or "/moestack/testing/" in path or (
                    frame.f_code.co_name.startswith("<")):
                return
            args = frame.f_locals
            if any(_holds(v, needles) for k, v in args.items() if k != "self") or (
                    "self" in args and _holds(args["self"], needles)):
                where = path.split("/moestack/", 1)[1]
                hops.append((where, frame.f_code.co_name))

        sys.setprofile(profile)
        import threading

        threading.setprofile(profile)
        try:
            stream = await client.chat.completions.create(
                model="fake-moe", messages=[{"role": "user", "content": "hello"}],
                max_tokens=4, stream=True)
            async for _ in stream:
                pass
            await asyncio.sleep(0.3)  # the settlement's batch
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    # a function that handles the identity is one hop, however often it is called
    path = list(dict.fromkeys(hops))
    files = {f for f, _ in path}
    rooms = [f.split("/")[0].removesuffix(".py") for f, _ in path]
    crossings = sum(1 for a, b in zip(rooms, rooms[1:]) if a != b)
    if verbose:
        for f, fn in path:
            print(f"  {f}:{fn}")
    print(f"tenant identity: {len(path)} hops over {len(files)} files in "
          f"{len(set(rooms))} rooms, {crossings} room crossings")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    asyncio.run(_run(args.verbose))


if __name__ == "__main__":
    main()
