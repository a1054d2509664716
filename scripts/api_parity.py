"""Write (or check) the API parity table of README.md from the installed vLLM's own server.

Every route vLLM's OpenAI server mounts (generation and pooling) and every body field of the
routes moestack relays, with moestack's status beside each. The fields come from vLLM's request
models themselves, so a vLLM upgrade that adds one makes ``--check`` fail until the table is
regenerated:

    .venv/bin/python scripts/api_parity.py          # rewrite the table in README.md
    .venv/bin/python scripts/api_parity.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moestack.api.endpoints import ENDPOINTS

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- api-parity:begin -->", "<!-- api-parity:end -->"

GATEWAY_ROUTES = {
    "/v1/models": "answered by the gateway: the calling tenant's models only",
    "/health": "answered by the gateway: every model's replicas",
}
NOT_RELAYED = {
    "/metrics": "not public: moestack's metrics are on the operator port, vLLM's engine "
                "metrics through Ray's metrics export",
    "/v1/responses/{response_id}": "not relayed: a stored response lives in one replica's "
                                   "memory, which a later request cannot be routed to",
    "/v1/responses/{response_id}/cancel": "not relayed (as above)",
    "/v1/chat/completions/batch": "not relayed: use one request per conversation",
}
NOT_RELAYED_REASON = "not relayed: engine operation or vLLM-internal route, not a tenant API"

READ = {"model": "read: routing, model access", "stream": "read: answer framing in the ledger",
        "n": "read: reservation covers every choice", "priority": "set by the gateway "
        "(tenant's tier; a client's value is overridden)", "cache_salt": "set by the gateway "
        "with tenancy on (the tenant's own salt: tenants share no prefix cache; a client's "
        "value is overridden)"}
TESTED = {
    "/v1/chat/completions": {"n", "logprobs", "top_logprobs", "response_format", "tools",
                             "tool_choice", "messages", "max_tokens", "stream", "ignore_eos"},
    "/v1/completions": {"prompt", "echo", "logit_bias", "max_tokens", "stream", "ignore_eos"},
    "/v1/responses": {"input", "max_output_tokens", "stream"},
    "/v1/messages": {"messages", "max_tokens", "stream", "ignore_eos"},
    "/tokenize": {"prompt", "add_special_tokens"},
    "/detokenize": {"tokens"},
}


def vllm_app():
    """vLLM's server app with the generation and pooling routers, without an engine."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.pooling.classify.api_router import router as classify
    from vllm.entrypoints.pooling.embed.api_router import router as embed
    from vllm.entrypoints.pooling.pooling.api_router import router as pooling
    from vllm.entrypoints.pooling.scoring.api_router import router as scoring
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "unused"])
    app = build_app(args, supported_tasks=("generate",), model_config=None)
    for router in (pooling, classify, embed, scoring):
        app.include_router(router)
    return app


def table() -> str:
    from fastapi.routing import APIRoute

    from moestack.engine.vllm_engine import request_fields

    app = vllm_app()
    fields = request_fields(app)
    relayed = {e.path: e for e in ENDPOINTS}
    routes = sorted({(r.path, m) for r in app.routes if isinstance(r, APIRoute)
                     for m in r.methods if m in ("GET", "POST")})
    out = ["| vLLM route | moestack |", "| --- | --- |"]
    for path, method in routes:
        if path in relayed and method == "POST":
            e = relayed[path]
            status = (f"relayed with tenancy, metering and routing (ledger endpoint "
                      f"`{e.name}`{'; Anthropic errors, `x-api-key`' if e.anthropic else ''})")
        else:
            status = GATEWAY_ROUTES.get(path) or NOT_RELAYED.get(path, NOT_RELAYED_REASON)
        out.append(f"| `{method} {path}` | {status} |")
    for path in [e.path for e in ENDPOINTS if e.path in fields]:
        e = relayed[path]
        read = dict(READ)
        read.update({f: "read: completion budget for the reservation" for f in e.budget_fields})
        if e.prompt_field:
            read[e.prompt_field] = "read: reservation bound and prefix-aware routing"
        for f in e.extra_prompt_fields:
            read.setdefault(f, "read: counted in the reservation bound")
        groups: dict[str, list[str]] = {}
        for name in sorted(fields[path]):
            status = read.get(name, "relayed as sent")
            if name in TESTED.get(path, ()):
                status += "; tested through the stack"
            groups.setdefault(status, []).append(f"`{name}`")
        out += ["", f"`POST {path}` body fields ({len(fields[path])}); any other field is "
                "a 400 naming it:", "", "| fields | moestack |", "| --- | --- |"]
        out += [f"| {', '.join(names)} | {status} |" for status, names in sorted(groups.items())]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = p.parse_args()
    text = README.read_text(encoding="utf-8")
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n" + table() + "\n" + text[stop:]
    if args.check:
        if new != text:
            print(f"{README} API parity table is stale: run {Path(__file__).name}",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"wrote the API parity table of {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
