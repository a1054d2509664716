"""Multi-tenant load generator and reports for OpenAI-compatible servers (moestack, vLLM, ...).

``moestack loadtest --scenario loadtest/scenarios/NAME.yaml --url http://HOST:PORT/v1`` runs a
scenario file; the functions here do the same from Python. Metric definitions match
``vllm bench serve`` (TTFT, TPOT, ITL, E2EL, goodput); see :mod:`moestack.loadtest.report`.
"""

from moestack.loadtest.client import RequestResult, run_requests
from moestack.loadtest.report import jain_index, render_text, summarize
from moestack.loadtest.runner import RunResult, resolve_api_keys, run_scenario
from moestack.loadtest.scenario import Scenario, load_scenario, parse_scenario
from moestack.loadtest.workload import RequestSpec, build_workload

__all__ = [
    "RequestResult",
    "RequestSpec",
    "RunResult",
    "Scenario",
    "build_workload",
    "jain_index",
    "load_scenario",
    "parse_scenario",
    "render_text",
    "resolve_api_keys",
    "run_requests",
    "run_scenario",
    "summarize",
]
