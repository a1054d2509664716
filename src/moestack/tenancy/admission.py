"""Authentication and admission against the store: keys, RPM/TPM/concurrency, budget.

Admission is one transaction per group of requests (:func:`admit_many`, which the store writer
calls once per batch, see :mod:`moestack.tenancy.writer`; :func:`admit` for one): lock the
tenants' counters rows, check each request's limits against the counters
(:mod:`moestack.tenancy.counters`: constant time whatever the ledger's size) as updated by the
requests admitted before it in the batch, insert the admitted requests' write-ahead ledger rows
with their reservations and add the reservations to the counters, the window buckets and the
hourly rollups, all in the same transaction, a few statements per batch whatever its size. The
limits themselves come with the principal (:class:`moestack.hooks.Principal`, its model list
included; :mod:`moestack.tenancy.auth_cache` keeps them at most ``tenancy.auth_cache_ttl_s``
stale):

* requests/min: requests started in the current 60 s window;
* tokens/min: their ``charged_tokens`` (prompt + max completion reserved while running, the real
  count once settled);
* concurrency: ``pending`` rows (a lost gateway's rows stop counting when they are closed);
* budget: ``charged_usd`` of rows started in the current period (UTC day, UTC month, or ever).

Because the reservation is an upper bound of the real cost and is committed before the engine
sees the request, concurrent and streamed requests cannot overspend, on any number of gateways.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from moestack.errors import (
    AuthenticationError,
    InsufficientQuotaError,
    InvalidRequestError,
    MoestackError,
    RateLimitError,
)
from moestack.hooks import Principal
from moestack.tenancy import counters, rollups
from moestack.tenancy.keys import parse_key, secret_matches
from moestack.tenancy.batch_sql import Statements
from moestack.tenancy.store import TenancyStore, period_start
from moestack.tenancy.tables import ApiKey, Tenant, utcnow
from moestack.usage import NUSD_PER_USD, to_nusd

WINDOW_S = counters.WINDOW_S


def principal_of(key: ApiKey, tenant: Tenant) -> Principal:
    return Principal(tenant.id, tenant.name, key.key_id, tenant.priority, tenant.weight,
                     tuple(tenant.allowed_models), tenant.requests_per_min,
                     tenant.tokens_per_min, tenant.max_concurrent_requests, tenant.budget_usd,
                     tenant.budget_period, tenant.overflow_policy or "never",
                     tenant.overflow_budget_usd)


@dataclass(frozen=True)
class Reservation:
    """What admission holds for a request until it is settled."""

    request_id: str
    tokens: int
    usd: float

    @property
    def nusd(self) -> int:
        """The reservation in nano-USD, rounded up (it must stay an upper bound)."""
        return math.ceil(self.usd * NUSD_PER_USD - 1e-6)

    def check_size(self, param: str | None = None) -> None:
        """400 (before anything is written) for a reservation past what one request may hold:
        with the models' ``request_limits`` none gets here, but whatever the configuration, the
        ledger's and counters' 64-bit integers must never overflow (a failed write would fail
        other requests' writes in the same batch)."""
        if self.tokens > MAX_RESERVATION_TOKENS or not self.usd * NUSD_PER_USD <= (
                MAX_RESERVATION_NUSD):
            raise InvalidRequestError(
                f"This request would reserve {self.tokens} tokens ({self.usd:.2f} USD), more "
                f"than one request may hold ({MAX_RESERVATION_TOKENS} tokens, "
                f"{MAX_RESERVATION_NUSD / NUSD_PER_USD:.0f} USD); lower `n`, the completion "
                "budget or the number of prompts.", param=param, code="reservation_too_large")


MAX_RESERVATION_TOKENS = 2**40
"""Most tokens one request may reserve (about 10^12: far past any context x n x prompts)."""
MAX_RESERVATION_NUSD = 10**15
"""Most nano-USD one request may reserve (1M USD): thousands of them in flight still fit the
counters' 64-bit sums."""


def authenticate(store: TenancyStore, api_key: str | None) -> Principal:
    """The principal of a bearer key read from the store; 401 for a missing, malformed, unknown
    or revoked key. (Gateways go through :class:`~moestack.tenancy.auth_cache.AuthCache`.)"""
    if not api_key:
        raise AuthenticationError.missing_key()
    parsed = parse_key(api_key)
    found = store.key_record(parsed[0]) if parsed else None
    return check_key(api_key, found)


def check_key(api_key: str, found: tuple[ApiKey, Tenant] | None) -> Principal:
    """Compare the key's secret with the stored hash in constant time; 401 unless it matches an
    unrevoked key."""
    parsed = parse_key(api_key)
    secret = parsed[1] if parsed else api_key
    ok = secret_matches(secret, found[0].secret_sha256 if found else None)
    if not ok or found is None or found[0].revoked_at is not None:
        raise AuthenticationError("Incorrect API key provided.")
    return principal_of(*found)


def period_bounds(period: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
    """Start and end (None: never ends) of the budget period containing ``now`` (naive UTC)."""
    start = period_start(period, now)
    if period == "day":
        return start, start + dt.timedelta(days=1)
    if period == "month":
        return start, (start + dt.timedelta(days=32)).replace(day=1)
    return start, None


_INSERT = (
    "INSERT INTO usage_ledger (request_id, tenant_id, key_id, model, endpoint, stream, state, "
    "prompt_tokens, cached_prompt_tokens, completion_tokens, reserved_tokens, reserved_usd, "
    "charged_tokens, charged_usd, started_at, gateway_id, lease_expires_at)",
    "(:id, :t, :key, :model, :endpoint, :stream, 'pending', 0, 0, 0, :tokens, :usd, :tokens, "
    ":usd, :now, :gw, :lease)")
"""No ``ON CONFLICT``: a row another gateway inserted since the duplicate check fails the batch,
which the writer then runs one admission per transaction (each sees the committed row and
refuses alone)."""
_USED_IDS = ("SELECT 2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, request_id "
             "FROM usage_ledger WHERE request_id IN :rids")
"""The request ids of the batch already in the ledger (read with the counters)."""


@dataclass(frozen=True)
class Admission:
    """One request to admit (what :func:`admit_many` takes)."""

    principal: Principal
    reservation: Reservation
    model: str
    endpoint: str
    stream: bool
    gateway_id: str
    lease_s: float
    now: dt.datetime | None = None


def admit(store: TenancyStore, principal: Principal, *, reservation: Reservation, model: str,
          endpoint: str, stream: bool, gateway_id: str, lease_s: float,
          now: dt.datetime | None = None) -> float | None:
    """:func:`admit_in` in a transaction of its own."""
    with store.begin() as conn:
        return admit_in(conn, principal, reservation=reservation, model=model,
                        endpoint=endpoint, stream=stream, gateway_id=gateway_id,
                        lease_s=lease_s, now=now)


def admit_in(conn: Connection, principal: Principal, *, reservation: Reservation, model: str,
             endpoint: str, stream: bool, gateway_id: str, lease_s: float,
             now: dt.datetime | None = None) -> float | None:
    """Check every limit and write the request's ledger row ahead, or raise 429 (having
    written nothing): :func:`admit_many` of one request.

    Returns the USD left in the tenant's budget period net of this and every running
    reservation (None when the tenant has no budget)."""
    (result,) = admit_many(conn, [Admission(principal, reservation, model, endpoint, stream,
                                            gateway_id, lease_s, now)])
    if isinstance(result, MoestackError):
        raise result
    return result


def admit_many(conn: Connection, items: list[Admission]) -> list[float | None | MoestackError]:
    """Admit ``items`` in order, each checked against the counters as the ones before it left
    them; per item, the USD left in its tenant's budget period net of every running reservation
    (None: no budget), or the error that refused it (a 401/429/400; a refused item writes
    nothing). The tenants' counters rows are locked first, in tenant-id order, and read with
    the window buckets and the request ids already used in one round trip; the writes go in
    another (see :mod:`moestack.tenancy.batch_sql`)."""
    batch_now = utcnow()
    db = Statements.of(conn)
    tenant_ids = sorted({a.principal.tenant_id for a in items})
    windowed = sorted({a.principal.tenant_id for a in items
                       if a.principal.requests_per_min is not None
                       or a.principal.tokens_per_min is not None})
    earliest = min((a.now or batch_now) for a in items)
    held, buckets, used_rows = counters.read_locked(
        db, tenant_ids, windowed, earliest,
        (_USED_IDS, {"rids": list({a.reservation.request_id for a in items})}, ("rids",)))
    used = {row[11] for row in used_rows}
    results: list[float | None | MoestackError] = []
    rows, added = [], {}
    deltas = rollups.RollupDeltas()
    for a in items:
        p, now = a.principal, a.now or batch_now
        c = held.get(p.tenant_id)
        try:
            if c is None:  # deleted since authentication
                raise AuthenticationError("Incorrect API key provided.")
            remaining = _check(a, c, buckets.get(p.tenant_id), now)
            if a.reservation.request_id in used:
                raise InvalidRequestError(
                    f"request id `{a.reservation.request_id}` was already used",
                    code="duplicate_request_id")
        except MoestackError as exc:
            results.append(exc)
            continue
        results.append(remaining)
        r, need = a.reservation, a.reservation.nusd
        used.add(r.request_id)
        rows.append({"id": r.request_id, "t": p.tenant_id, "key": p.key_id, "model": a.model,
                     "endpoint": a.endpoint, "stream": a.stream, "tokens": r.tokens,
                     "usd": need / NUSD_PER_USD, "now": db.time(now), "gw": a.gateway_id,
                     "lease": db.time(now + dt.timedelta(seconds=a.lease_s))})
        c.inflight += 1
        c.add(now, need)
        second = counters.epoch_second(now)
        if p.tenant_id in buckets:
            bucket = buckets[p.tenant_id].setdefault(second, [0, 0])
            bucket[0] += 1
            bucket[1] += r.tokens
        acc = added.setdefault((p.tenant_id, second), [0, 0])
        acc[0] += 1
        acc[1] += r.tokens
        deltas.add(p.tenant_id, a.model, a.endpoint, now, requests=1, charged_tokens=r.tokens,
                   charged_nusd=need)
    if rows:
        db.insert(*_INSERT, rows)
        counters.write_all(db, [held[t] for t in sorted({row["t"] for row in rows})])
        counters.add_buckets(db, added)
        deltas.write(db)
        db.done()
    return results


def _check(a: Admission, c: counters.Counters, buckets: dict[int, list[int]] | None,
           now: dt.datetime) -> float | None:
    """Raise the 429 that refuses ``a`` against its tenant's counters ``c`` (rolled to ``now``)
    and window ``buckets`` (second -> [requests, tokens]); else the USD left after it."""
    p, reservation = a.principal, a.reservation
    c.roll(now)
    if p.max_concurrent_requests is not None and c.inflight >= p.max_concurrent_requests:
        raise RateLimitError(
            f"Rate limit reached for concurrent requests: limit {p.max_concurrent_requests}, "
            f"in flight {c.inflight}.", retry_after_s=1.0)
    if buckets is not None:
        after = counters.epoch_second(now) - WINDOW_S
        recent = sorted((s, r, t) for s, (r, t) in buckets.items() if s > after)
        _check_rpm(p.requests_per_min, recent, now)
        _check_tpm(p.tokens_per_min, recent, reservation.tokens, now)
    if p.budget_usd is None:
        return None
    need = reservation.nusd
    spent, budget = c.spent_nusd(p.budget_period), to_nusd(p.budget_usd)
    if spent + need > budget:
        end = period_bounds(p.budget_period, now)[1]
        retry = (end - now).total_seconds() if end else 86400.0
        raise InsufficientQuotaError(
            f"You exceeded your current quota: budget {p.budget_usd:g} USD per "
            f"{p.budget_period}, {spent / NUSD_PER_USD:.6f} USD spent or reserved, this "
            f"request reserves up to {need / NUSD_PER_USD:.6f} USD.", retry_after_s=retry)
    return (budget - spent - need) / NUSD_PER_USD


def _bucket_leaves(second: int, now: dt.datetime) -> float:
    """Seconds until the bucket of ``second`` leaves the window ending at ``now``."""
    return max(0.05, second + WINDOW_S - (now - counters.EPOCH).total_seconds())


def _check_rpm(limit: int | None, recent: list, now: dt.datetime) -> None:
    used = sum(r for _, r, _ in recent)
    if limit is None or used < limit:
        return
    # The request can go once enough of the oldest buckets have left the window.
    retry, freed = float(WINDOW_S), 0
    for second, requests, _ in recent:
        freed += requests
        if used - freed < limit:
            retry = _bucket_leaves(second, now)
            break
    raise RateLimitError(f"Rate limit reached for requests per minute: limit {limit}, "
                         f"used {used}.", retry_after_s=retry)


def _check_tpm(limit: int | None, recent: list, need: int, now: dt.datetime) -> None:
    if limit is None:
        return
    used = sum(t for _, _, t in recent)
    if used + need <= limit:
        return
    if need > limit:
        raise RateLimitError(f"Rate limit reached for tokens per minute: this request reserves "
                             f"{need} tokens (prompt + max completion), more than the limit "
                             f"{limit}; lower max_tokens.", retry_after_s=WINDOW_S)
    freed, retry = 0, float(WINDOW_S)
    for second, _, tokens in recent:
        freed += tokens
        if used - freed + need <= limit:
            retry = _bucket_leaves(second, now)
            break
    raise RateLimitError(f"Rate limit reached for tokens per minute: limit {limit}, used "
                         f"{used}, requested {need}.", retry_after_s=retry)
