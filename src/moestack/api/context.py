"""The request context of the public routes: made once per request, carried by it to the end.

:func:`request_context` is the FastAPI dependency of every OpenAI route: it makes the request's
:class:`~moestack.hooks.RequestContext` (its id, the key it carries, the client's address), runs
the hooks' ``on_request`` point (authentication: the principal goes on the context, or 401)
before anything reads the body, and hands the context to the route; the relay takes it on
through the other hook points. The context is also left on the ASGI scope's state, where the
rejection counter (:mod:`moestack.metering.rejections`), which wraps the routes, finds the
principal of a refused request.
"""

from __future__ import annotations

import uuid

from fastapi import Request

from moestack.hooks import RequestContext


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else of an ``x-api-key``
    header (what the Anthropic SDK sends), else None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    return request.headers.get("x-api-key")


async def request_context(request: Request) -> RequestContext:
    """The request's context, authenticated by the app's hooks (401 for a bad key when tenancy
    is on); the key itself goes no further than authentication."""
    ctx = RequestContext(request_id=uuid.uuid4().hex, api_key=bearer_token(request),
                         client=request.client.host if request.client else None)
    request.state.context = ctx
    await request.app.state.hooks.on_request(ctx)
    ctx.api_key = None
    return ctx
