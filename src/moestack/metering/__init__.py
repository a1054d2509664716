"""Metering: Prometheus metrics of the gateway (and, later, cost)."""
