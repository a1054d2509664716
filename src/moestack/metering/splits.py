"""The cost report's splits of raw ledger rows (:class:`~moestack.tenancy.ledger.LedgerEntry`)
along one dimension: per tenant, model and LoRA adapter (``moestack cost report
--by-adapter``), and per backend, self-hosted replicas or an overflow provider (``--by-backend``:
the blended USD per 1M tokens, the share overflowed, the saving against sending everything to
the API). Sums are integer nano-USD, so they are exact. A row's ``cost_usd`` is the engine work
at the replica's rate for ``replica`` rows and the provider's bill for ``provider:<name>`` rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from moestack.usage import NUSD_PER_USD, to_nusd


@dataclass
class Totals:
    """Requests, tokens and USD of the rows that share one key."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nusd: int = 0
    charged_nusd: int = 0
    api_nusd: int = 0
    """What the same tokens would cost at the model's overflow provider (all to the API)."""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def usd(self) -> float:
        return self.cost_nusd / NUSD_PER_USD

    def per_1m(self) -> float | None:
        return self.usd / self.tokens * 1e6 if self.tokens else None

    def add(self, entry, api_usd: float | None = None) -> None:
        self.requests += 1
        self.prompt_tokens += entry.prompt_tokens
        self.completion_tokens += entry.completion_tokens
        self.cost_nusd += to_nusd(entry.cost_usd)
        self.charged_nusd += to_nusd(entry.charged_usd)
        self.api_nusd += to_nusd(api_usd)


ApiPrice = Callable[[object], float | None]
"""A ledger row -> USD its tokens cost at its model's overflow provider (None: no rule)."""


def split(entries: Iterable, key: Callable[[object], Hashable], api_price: ApiPrice | None = None
          ) -> tuple[dict[Hashable, Totals], Totals]:
    """Rows summed per ``key(row)``, and over all rows."""
    lines: dict[Hashable, Totals] = {}
    total = Totals()
    for e in entries:
        api = api_price(e) if api_price is not None else None
        lines.setdefault(key(e), Totals()).add(e, api)
        total.add(e, api)
    return lines, total


def by_adapter(entries: Iterable) -> dict[tuple[str, str, str | None], Totals]:
    """Per (tenant, model, adapter), base-model rows as adapter None."""
    return split(entries, lambda e: (e.tenant, e.model, e.adapter))[0]


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_adapter_table(lines: dict[tuple[str, str, str | None], Totals]) -> str:
    """The per-adapter split as a text table."""
    out = [f"{'tenant':14} {'model':16} {'adapter':16} {'requests':>8} {'tokens':>9} "
           f"{'self-hosted USD':>16} {'USD/1M tok':>11} {'charged USD':>14}"]
    for (tenant, model, adapter), x in sorted(lines.items(),
                                              key=lambda kv: (*kv[0][:2], kv[0][2] or "")):
        out.append(f"{tenant[:14]:14} {model[:16]:16} {(adapter or '(base)')[:16]:16} "
                   f"{x.requests:>8} {x.tokens:>9} {x.usd:>16.9f} "
                   f"{_fmt(x.per_1m(), '.4f'):>11} {x.charged_nusd / NUSD_PER_USD:>14.9f}")
    return "\n".join(out)


def format_backend_table(lines: dict[str, Totals], total: Totals) -> str:
    """The per-backend split (``split(entries, lambda e: e.backend, api_price)``) as a text
    table, with the share overflowed, the blended USD per 1M tokens and the saving."""
    out = [f"{'backend':20} {'requests':>8} {'share':>6} {'tokens':>10} {'USD':>14} "
           f"{'USD/1M tok':>11}"]
    for backend, x in [*sorted(lines.items()), ("(all)", total)]:
        share = x.requests / total.requests if total.requests else 0.0
        out.append(f"{backend[:20]:20} {x.requests:>8} {share:>6.2%} {x.tokens:>10} "
                   f"{x.usd:>14.9f} {_fmt(x.per_1m(), '.4f'):>11}")
    overflowed = sum(x.requests for b, x in lines.items() if b.startswith("provider:"))
    out.append(f"overflowed: {overflowed}/{total.requests} requests; blended USD per 1M tokens: "
               f"{_fmt(total.per_1m(), '.4f')}")
    if total.api_nusd:
        out.append(f"everything to the API: {total.api_nusd / NUSD_PER_USD:.9f} USD; saving "
                   f"{(total.api_nusd - total.cost_nusd) / NUSD_PER_USD:.9f} USD")
    return "\n".join(out)
