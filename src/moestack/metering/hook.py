"""The metering hook of the request path: every request priced once, when it ends.

``on_complete`` runs first among the hooks (the last one in runs first out): it prices the
request's record with the cost model (self-hosted, baseline and charged USD) and puts the price
on the context, where tenancy's admission hook reads it for the ledger row, then counts the
request and its price in the gateway's metrics and hands the record to the other usage sinks.
Only requests that went through every hook reach it: refused ones are counted by
:mod:`moestack.metering.rejections`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

from moestack.hooks import RequestContext, RequestHook
from moestack.metering.metrics import GatewayMetrics
from moestack.usage import RequestRecord

log = logging.getLogger(__name__)


class UsageSink(Protocol):
    def record(self, record: RequestRecord) -> None: ...


class Metering(RequestHook):
    """Prices each finished request once and records it in ``metrics`` and ``sinks``."""

    def __init__(self, metrics: GatewayMetrics, sinks: Sequence[UsageSink] = ()):
        self.metrics = metrics
        self.sinks = list(sinks)

    async def on_complete(self, ctx: RequestContext) -> None:
        rec = ctx.record
        model = self.metrics.cost_model
        ctx.cost = model.price(rec) if model is not None else None
        if ctx.cost is not None and ctx.adapter_usd_per_1m_tokens is not None:
            # A registered adapter's own price replaces the base model's tenant price.
            ctx.cost = dataclasses.replace(ctx.cost, charged_usd=(
                rec.prompt_tokens + rec.completion_tokens) * ctx.adapter_usd_per_1m_tokens / 1e6)
        for sink in (self.metrics, *self.sinks):
            try:
                if sink is self.metrics:
                    self.metrics.record(rec, ctx.cost)
                else:
                    sink.record(rec)
            except Exception:  # fail open on purpose: a broken sink must not fail the request
                log.exception("usage sink %r failed for request %s", sink, rec.request_id)
