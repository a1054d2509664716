"""Load the configuration tree from YAML, with errors that name the field and the reason."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moestack.config.schema import MoestackConfig
from moestack.errors import ConfigError

EMBEDDED_DEFAULT = "local.yaml"


def embedded_default_path() -> Path:
    """The embedded default config (``deploy/local.yaml`` in the repository)."""
    return Path(str(resources.files("moestack.config").joinpath(EMBEDDED_DEFAULT)))


def load_config(path: str | Path | None = None) -> MoestackConfig:
    """Read ``path`` (the embedded default when ``None``) into a validated :class:`MoestackConfig`.

    Relative paths inside the file are resolved against the file's folder; ``~`` is expanded.
    Raises :class:`ConfigError` naming each bad field.
    """
    path = Path(path) if path is not None else embedded_default_path()
    raw = read_yaml(path, "config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (models, ...)")
    return parse_config(raw, base_dir=path.parent, source=str(path))


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; unreadable or malformed files raise :class:`ConfigError`."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc


def parse_config(raw: dict[str, Any], base_dir: Path | None = None,
                 source: str = "<config>") -> MoestackConfig:
    """Validate an already-parsed mapping; see :func:`load_config`."""
    try:
        config = MoestackConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    return _resolve_paths(config, base_dir or Path.cwd())


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        where = _dotted(err["loc"]) or "(top level)"
        got = ""
        if err["type"] not in ("missing", "extra_forbidden") and "input" in err:
            got = f" (got {err['input']!r})"
        reason = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {where}: {reason}{got}")
    return "\n".join(lines)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_paths(config: MoestackConfig, base: Path) -> MoestackConfig:
    models = [m.model_copy(update={"path": _resolve(m.path, base)}) for m in config.models]
    url = config.storage.url
    if env := config.storage.url_env:
        if not os.environ.get(env):
            raise ConfigError(f"storage.url_env names the environment variable {env}, "
                              "which is not set")
        url = os.environ[env]
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        db = url.removeprefix("sqlite:///")
        if db and db != ":memory:":
            url = f"sqlite:///{_resolve(Path(db), base)}"
    return config.model_copy(update={
        "models": models,
        "pricing_file": _resolve(config.pricing_file, base),
        "cache_dir": _resolve(config.cache_dir, base),
        # url_env is resolved once: the loaded config no longer depends on the environment.
        "storage": config.storage.model_copy(update={"url": url, "url_env": None}),
        "ray": config.ray.model_copy(update={"temp_dir": _resolve(config.ray.temp_dir, base)}),
    })
