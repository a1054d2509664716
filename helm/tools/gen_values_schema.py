"""Generate helm/moestack/values.schema.json.

The chart's own keys are described in `chart-values.schema.json` (hand-kept, beside this
script); the `moestack` key is the moestack configuration schema itself
(`MoestackConfig.model_json_schema()`), so values that `moestack up` would refuse fail at
`helm install`/`helm template` time too. Run after changing either:

    .venv/bin/python helm/tools/gen_values_schema.py          # rewrite the file
    .venv/bin/python helm/tools/gen_values_schema.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moestack.config.schema import MoestackConfig

HERE = Path(__file__).resolve().parent
CHART_PART = HERE / "chart-values.schema.json"
TARGET = HERE.parent / "moestack" / "values.schema.json"


def build_schema() -> dict:
    """The chart's values schema with the moestack config schema under `moestack`."""
    chart = json.loads(CHART_PART.read_text(encoding="utf-8"))
    config = MoestackConfig.model_json_schema()
    defs = config.pop("$defs", {})
    # pydantic refers to "#/$defs/Name": keep the definitions at the root so the refs resolve.
    chart["$defs"] = {**chart.get("$defs", {}), **defs}
    chart["properties"]["moestack"] = config
    return chart


def render() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is stale: run helm/tools/gen_values_schema.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
