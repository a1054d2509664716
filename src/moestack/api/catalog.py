"""One catalog for the ``model`` a request names: a base model, or a LoRA adapter over one.

:func:`resolve_model` is what the relay and ``/v1/models/{model}`` ask: a configured model the
caller's model list admits, or a registered adapter the caller's tenant may use (its owner, or a
tenant it is shared with) over a base model the caller's list admits. Anything else, a missing
name or another tenant's adapter alike, is the one :meth:`ModelNotFoundError.of` 404, so a tenant
learns nothing about other tenants' adapters.
"""

from __future__ import annotations

from moestack.config.schema import MoestackConfig, ModelConfig
from moestack.errors import ModelNotFoundError
from moestack.hooks import Principal
from moestack.tenancy.adapters import AdapterCatalog, AdapterRecord


async def resolve_model(config: MoestackConfig, adapters: AdapterCatalog | None,
                        principal: Principal | None, name: str
                        ) -> tuple[ModelConfig, AdapterRecord | None]:
    """The base model that serves ``name`` and the adapter it names (None for a base model);
    404 if the caller may not use it."""
    model = config.model(name)
    if model is not None:
        if principal is not None and not principal.allows(name):
            raise ModelNotFoundError.of(name)
        return model, None
    if adapters is not None and principal is not None:
        adapter = await adapters.usable(name, principal.tenant)
        base = config.model(adapter.base_model) if adapter is not None else None
        if base is not None and principal.allows(base.name):
            return base, adapter
    raise ModelNotFoundError.of(name)
