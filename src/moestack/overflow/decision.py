"""Whether one request overflows to a provider: a pure function of what the gateway knows.

A request overflows only if all of these hold:

* its tenant's policy is ``allowed`` (``never`` is the default: data leaves the house);
* its model has an overflow rule, whose provider serves the request's endpoint and has room
  under its concurrency cap;
* the rule's trigger fired: the tenant's predicted wait in the model's fair queue is over
  ``max_queue_wait_ms`` (a wait the queue cannot predict yet never triggers), or no replica
  could take the request (and ``on_no_healthy_replica`` is on).

The overflow budget is checked after this, by the reservation (a refused reservation means the
request waits, or gets today's 503, as if it had no overflow rule).
"""

from __future__ import annotations

from enum import Enum

from moestack.config.schema import OverflowRuleConfig

ALLOWED = "allowed"
NEVER = "never"


class Trigger(str, Enum):
    QUEUE_WAIT = "queue_wait"
    NO_REPLICA = "no_replica"


def wait_over_bound(rule: OverflowRuleConfig, predicted_wait_s: float | None) -> bool:
    """Whether the predicted wait (None: unknown) is over the rule's bound."""
    return (rule.max_queue_wait_ms is not None and predicted_wait_s is not None
            and predicted_wait_s * 1000 > rule.max_queue_wait_ms)


def should_overflow(policy: str, rule: OverflowRuleConfig | None, provider_ready: bool,
                    trigger: Trigger, predicted_wait_s: float | None = None) -> bool:
    """Whether a request may go to the rule's provider now (see the module docstring);
    ``provider_ready``: the provider serves the endpoint and has room."""
    if policy != ALLOWED or rule is None or not provider_ready:
        return False
    if trigger is Trigger.NO_REPLICA:
        return rule.on_no_healthy_replica
    return wait_over_bound(rule, predicted_wait_s)
