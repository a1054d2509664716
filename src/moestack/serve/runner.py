"""`moestack up`: run the whole stack on a local (or existing) Ray cluster until Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from moestack.api.admin.key import check_admin_key
from moestack.config.schema import MoestackConfig
from moestack.vllm_cpu.libraries import checkpoint_unsupported_reason
from moestack.engine.source import resolve_checkpoint
from moestack.errors import ConfigError
from moestack.serve.shm import clean_orphans

if TYPE_CHECKING:
    from moestack.tenancy.leases import LeaseSweeper

Say = Callable[[str], None]

DEPLOY_TIMEOUT_S = 900.0
POLL_INTERVAL_S = 0.25
"""How often the deploy loop asks Serve's controller for the app's status (one cheap call): the
stack is reported ready at most this long after Serve has it running."""
STOP_TIMEOUT_S = 90.0
"""Longest a stop may take: Serve's shutdown waits up to 30 s for replicas to drain, then Ray's
takes seconds; past this the process exits anyway, saying so (a stop must never hang)."""

THROUGHPUT_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(512 * 1024 * 1024),
}
"""Ray Serve's throughput profile (what ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` turns on, less
its ingress and logging choices, which moestack makes itself): replica code and the handle's
router on the replica's own event loop instead of one thread each (no cross-thread hop per
chunk); handle calls over gRPC between replicas instead of Ray's object transport; request logs
buffered; the startup heap frozen out of the garbage collector; gRPC messages between replicas
up to 512 MiB instead of gRPC's 4 MiB (a non-streamed answer is one message: long logprobs
outgrow 4 MiB). The Helm chart sets the same."""


class StackFailed(RuntimeError):
    """The application could not be deployed; the message says which deployment and why."""


def prepare_models(config: MoestackConfig, say: Say) -> None:
    """Build missing tiny checkpoints here, with progress, before replicas look for them; and
    refuse at once a model this host's vLLM CPU kernels cannot run (engines on a local Ray
    run on this CPU), instead of an engine traceback minutes later."""
    for model in config.models:
        if model.engine != "vllm":
            continue
        if model.tiny is not None:
            say(f"model {model.name}: tiny {model.tiny.arch} checkpoint (seed {model.tiny.seed})")
            path = resolve_checkpoint(model, config.cache_dir, progress=lambda m: say("  " + m))
            say(f"  ready at {path}")
        elif model.path is not None and not config.ray.address:
            path = model.path
        else:
            continue
        if reason := checkpoint_unsupported_reason(path):
            raise StackFailed(f"model {model.name}: {reason}")


def start_ray(config: MoestackConfig, verbose: bool) -> None:
    import ray

    from moestack.serve.app import store_url_env
    from moestack.serve.http_limits import PROXY_CALLBACK_ENV

    kwargs = {"include_dashboard": False, "log_to_driver": verbose,
              "logging_level": "INFO" if verbose else "WARNING"}
    if config.ray.address:
        ray.init(address=config.ray.address, **kwargs)
        return
    if config.monitoring.ray_metrics_export_port:
        kwargs["_metrics_export_port"] = config.monitoring.ray_metrics_export_port
    # Read by Serve's processes when they start: Serve's settings, its HTTP servers' header
    # limits, and a store URL with a password (which never goes in deployment arguments).
    os.environ.update(serve_env(config) | PROXY_CALLBACK_ENV | store_url_env(config))
    if config.ray.temp_dir:
        kwargs["_temp_dir"] = str(config.ray.temp_dir)
    ray.init(num_cpus=config.ray.num_cpus, **kwargs)


def serve_env(config: MoestackConfig) -> dict[str, str]:
    """Ray Serve's environment for this config: Ray's own direct ingress stays off in both
    ingress modes (with ``gateway.ingress: direct`` the Gateway replicas bind ``gateway.port``
    themselves, see :mod:`moestack.serve.public_listener`) and, with
    ``ray.serve_throughput_optimized``, :data:`THROUGHPUT_ENV`."""
    env = dict(THROUGHPUT_ENV) if config.ray.serve_throughput_optimized else {}
    return env | {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def deploy(config: MoestackConfig, say: Say, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Deploy the app and wait until it runs, printing each deployment's status as it changes."""
    from ray import serve

    from moestack.serve.app import APP_NAME, build_app
    from moestack.serve.placement import PlacementError, check_app_fits_cluster

    try:  # Serve would wait forever for a placement group the cluster can never host
        check_app_fits_cluster(config.models)
    except PlacementError as exc:
        raise StackFailed(exc.message) from None
    gw = config.gateway
    if gw.ingress == "proxy":
        serve.start(http_options={"host": gw.host, "port": gw.port})
    else:  # the Gateway replicas listen on `port` themselves: no Serve proxy at all
        serve.start(proxy_location="Disabled")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        except Exception as exc:  # reported by the polling loop below
            errors.append(exc)

    thread = threading.Thread(target=run, name="moestack-deploy", daemon=True)
    thread.start()
    started, last = time.monotonic(), None
    while thread.is_alive() or not errors:
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            states = {name: d.status.value for name, d in app.deployments.items()}
            line = ", ".join(f"{n}: {s}" for n, s in sorted(states.items()))
            if line != last:
                say(f"  [{time.monotonic() - started:5.0f} s] {line}")
                last = line
            if app.status.value == "DEPLOY_FAILED":
                details = "; ".join(f"{n}: {d.message}" for n, d in app.deployments.items()
                                    if d.message)
                raise StackFailed(f"deployment failed: {details or app.message}")
            if app.status.value == "RUNNING" and not thread.is_alive():
                return
        if time.monotonic() - started > timeout_s:
            raise StackFailed(f"the app was not running after {timeout_s:g} s")
        time.sleep(POLL_INTERVAL_S)
    raise StackFailed(f"deployment failed: {errors[0]}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def take_stop_signals() -> dict[int, object]:
    """Make SIGINT and SIGTERM stop the stack (KeyboardInterrupt in the main thread); returns
    the handlers they had. Set explicitly: Python keeps SIGINT ignored when the process started
    with it ignored, as a shell does for background jobs, and a stop must work there too."""
    return {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}


def exit_if_stuck(timeout_s: float, say: Say) -> threading.Timer:
    """End the process ``timeout_s`` from now, exit code 1, unless it has ended by then: covers
    Ray's shutdown and the interpreter's exit (a thread left behind that never ends)."""

    def exit_now() -> None:
        say(f"the stack did not stop within {timeout_s:g} s; exiting anyway")
        os._exit(1)

    timer = threading.Timer(timeout_s, exit_now)
    timer.daemon = True
    timer.start()
    return timer


def shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def ensure_bootstrap_key(config: MoestackConfig) -> str | None:
    """With tenancy on and no tenant yet, create ``tenancy.bootstrap_tenant`` and return its key
    (the only time it is ever shown); else None. Migrates the store as a side effect."""
    if not config.tenancy.enabled:
        return None
    from moestack.tenancy.store import TenancyStore

    store = TenancyStore.open(config.storage.url)
    try:
        if config.tenancy.bootstrap_tenant and not store.list_tenants():
            return store.create_tenant(config.tenancy.bootstrap_tenant)[1].plaintext
        return None
    finally:
        store.close()


def start_sweeper(config: MoestackConfig) -> LeaseSweeper | None:
    """With tenancy on, a :class:`~moestack.tenancy.leases.LeaseSweeper` in this process: the
    rows of a dead gateway close as ``lost`` within ``tenancy.lease_s`` even while no gateway
    is alive (the only one was killed and its successor is starting)."""
    if not config.tenancy.enabled:
        return None
    from moestack.tenancy.leases import LeaseSweeper
    from moestack.tenancy.store import TenancyStore

    store = TenancyStore.open(config.storage.url, migrate=False,
                              busy_timeout_s=config.storage.busy_timeout_s)
    sweeper = LeaseSweeper(store, config.tenancy.lease_s)
    sweeper.start()
    return sweeper


def operator_note(config: MoestackConfig) -> str:
    """Where the admin API and /metrics are: the operator listener, one port per replica."""
    gw = config.gateway
    ports = gw.operator_ports
    where = f"http://{gw.operator_host}:{ports.start}"
    if len(ports) > 1:
        where += f" (one port per gateway replica, {ports.start}-{ports.stop - 1})"
    admin = "/admin/v1, " if config.tenancy.enabled else ""
    return f"  operator ({admin}/metrics; not public): {where}\n"


def banner(config: MoestackConfig, api_key: str | None = None) -> str:
    base = f"http://{config.gateway.host}:{config.gateway.port}"
    model = config.models[0].name
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Hello!"}], '
            '"max_tokens": 16}' % model)
    key_note = ""
    if not config.tenancy.enabled:
        shell_key, py_key = "none", "'none'"
    elif api_key:
        shell_key, py_key = api_key, repr(api_key)
        key_note = (f"  API key of tenant `{config.tenancy.bootstrap_tenant}` (shown only now, "
                    f"store it): {api_key}\n\n")
    else:
        shell_key, py_key = "$MOESTACK_API_KEY", "os.environ['MOESTACK_API_KEY']"
        key_note = ("  export MOESTACK_API_KEY=<a tenant key>  (keys are shown once; make one "
                    "with `moestack tenants create-key <tenant>`)\n\n")
    py = ("import os; from openai import OpenAI; c = OpenAI(base_url='%s/v1', api_key=%s); "
          "print(c.chat.completions.create(model='%s', max_tokens=16, messages=[{'role': "
          "'user', 'content': 'Hello!'}]).choices[0].message.content)" % (base, py_key, model))
    models = ", ".join(m.name for m in config.models)
    return (f"moestack is up at {base}/v1  (models: {models})\n\n"
            f"{key_note}"
            f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -H \"Authorization: Bearer {shell_key}\" \\\n"
            f"    -d '{body}'\n\n"
            f"  python -c \"{py}\"\n\n"
            f"  health: {base}/health\n"
            f"{operator_note(config)}"
            "Press Ctrl-C to stop.")


def up(config: MoestackConfig, say: Say = print, verbose: bool = False) -> int:
    """Start everything, serve until SIGINT/SIGTERM, then stop everything. Returns an exit code."""

    previous = take_stop_signals()
    sweeper = None
    started = time.time()
    try:
        if config.tenancy.enabled:
            check_admin_key(config.tenancy.admin_key_env)  # before minutes of model loading
        prepare_models(config, say)
        say(f"starting Ray ({config.ray.address or f'local, {config.ray.num_cpus} CPUs'})")
        start_ray(config, verbose)
        # ray.init installs Ray's own SIGTERM handler (it dumps a stack and aborts): take the
        # signals back so `kill` / `docker stop` stop the stack as cleanly as Ctrl-C.
        take_stop_signals()
        api_key = ensure_bootstrap_key(config)
        sweeper = start_sweeper(config)
        say("deploying the Serve app (loading models) ...")
        deploy(config, say)
        say(banner(config, api_key))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("\nstopping ...")
        return 0
    except (StackFailed, ConfigError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        # A second Ctrl-C must not leave Ray half stopped.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        guard = exit_if_stuck(STOP_TIMEOUT_S, say)
        try:
            shutdown()
            # The engines' /dev/shm files that a killed process never unlinked (moestack.serve.shm)
            clean_orphans(since=started, min_age_s=0)
        finally:
            if sweeper is not None:
                sweeper.stop()
                sweeper.store.close()
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            # Stopped: the caller owns its process from here (`moestack up` arms its own guard
            # for the interpreter's exit), and a library caller must not be ended later.
            guard.cancel()
        say("stopped.")
