"""Put the services' configuration schema into charts/freemask/values.schema.json, under `config`.

The chart's `config` value is the services' own configuration (services/shared/config.py),
so its schema is derived from FreemaskConfig instead of being written twice. Run this after
changing the configuration; tests/unit/test_chart.py fails while the chart holds another copy:

    .venv/bin/python charts/sync_config_schema.py           # rewrite the chart's schema
    .venv/bin/python charts/sync_config_schema.py --check   # exit 1 if it is out of date

The schema checks names, types, ranges and enumerations when Helm installs; cross-field
rules (prompt templates naming their slots, readable secret files) stay with the services,
which refuse to start on them, and with the chart tests, which load every rendered config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from freemask.shared.config import FreemaskConfig

VALUES_SCHEMA = Path(__file__).resolve().with_name("freemask") / "values.schema.json"
DEF_PREFIX = "config."
# Generated and documented elsewhere (the config's docstrings, README "Configuration").
_DROPPED_KEYWORDS = ("title", "default")
_SECRET_NOTE = "a credential: never in values (the chart mounts storeCredentials and kafkaCredentials)"


def _is_secret(schema: dict[str, Any]) -> bool:
    return any(option.get("format") == "password" for option in schema.get("anyOf", [schema]))


def _loosen(schema: Any) -> Any:
    """The config schema as a values file needs it.

    Nothing is required, because the chart's values are one layer over the packaged defaults
    (a partial section is completed by them), and credentials are refused outright, so none
    can end up in a ConfigMap.
    """
    if isinstance(schema, list):
        return [_loosen(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    loosened = {key: _loosen(value) for key, value in schema.items()
                if key not in (*_DROPPED_KEYWORDS, "required")}
    if isinstance(schema.get("properties"), dict):
        loosened["properties"] = {
            name: ({"not": {}, "description": _SECRET_NOTE} if _is_secret(prop) else _loosen(prop))
            for name, prop in schema["properties"].items()
        }
    return loosened


def config_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(schema of `config`, the definitions it refers to, named `config.<Model>`)."""
    generated = FreemaskConfig.model_json_schema(ref_template=f"#/$defs/{DEF_PREFIX}{{model}}")
    definitions = {f"{DEF_PREFIX}{name}": _loosen(body) for name, body in generated.pop("$defs").items()}
    top = _loosen(generated)
    top["description"] = ("The services' configuration (services/shared/config.py), written as freemask.yaml "
                          "into the ConfigMap every pod reads")
    return top, definitions


def synced(values_schema: dict[str, Any]) -> dict[str, Any]:
    """`values_schema` with its `config` property and config definitions replaced by the current ones."""
    top, definitions = config_schema()
    result = dict(values_schema)
    result["properties"] = {**values_schema["properties"], "config": top}
    kept = {name: body for name, body in values_schema.get("$defs", {}).items() if not name.startswith(DEF_PREFIX)}
    result["$defs"] = {**kept, **dict(sorted(definitions.items()))}
    return result


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether the chart's copy is current")
    args = parser.parse_args(argv)
    current = VALUES_SCHEMA.read_text()
    wanted = render(synced(json.loads(current)))
    if current == wanted:
        return 0
    if args.check:
        print(f"{VALUES_SCHEMA} is out of date; run {Path(__file__).name}", file=sys.stderr)
        return 1
    VALUES_SCHEMA.write_text(wanted)
    print(f"wrote {VALUES_SCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
