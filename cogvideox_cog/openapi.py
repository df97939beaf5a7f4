"""Write the input schema `cog build` would put in `.cog/openapi_schema.json`.

Cog's server validates inputs only against that file, and only `cog build` (a Go static
analyser, not available without Docker) writes it. Without it a locally served predictor
accepts anything. This reads the same declarations through cog's own Python inspector and
lays them out as the build does, so `script/serve` and the tests refuse bad input exactly
as a deployed image does.

Usage: python -m cogvideox_cog.openapi predict_t2v.py:Predictor [OUTPUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cog import _adt
from cog._inspector import create_predictor

SCHEMA_PATH = Path(".cog/openapi_schema.json")

_CONSTRAINTS = {
    "description": "description",
    "minimum": "ge",
    "maximum": "le",
    "minLength": "min_length",
    "maxLength": "max_length",
    "pattern": "regex",
}


def _input_schema(info: _adt.PredictorInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    enums: dict[str, Any] = {}
    for name, field in info.inputs.items():
        nullable = field.type.repetition in (
            _adt.Repetition.OPTIONAL,
            _adt.Repetition.OPTIONAL_REPEATED,
        )
        prop: dict[str, Any] = {"x-order": field.order}
        if field.choices:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(field.choices),
                "type": field.type.primitive.json_type()["type"],
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = name.replace("_", " ").title()
            prop.update(field.type.json_type())
        if field.default is not None:
            prop["default"] = field.type.json_encode(field.default)
        elif not nullable:
            required.append(name)
        if nullable:
            prop["nullable"] = True
        for key, attribute in _CONSTRAINTS.items():
            value = getattr(field, attribute)
            if value is not None:
                prop[key] = value
        if field.deprecated:
            prop["deprecated"] = True
        properties[name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def build_schema(predictor_ref: str) -> dict[str, Any]:
    """The OpenAPI document for "path/to/predict.py:ClassName" (its directory is importable)."""
    module_file, class_name = predictor_ref.rsplit(":", 1)
    module_path = Path(module_file).resolve()
    sys.path.insert(0, str(module_path.parent))
    try:
        info = create_predictor(module_path.stem, class_name)
    finally:
        sys.path.remove(str(module_path.parent))
    inputs, enums = _input_schema(info)
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": {"Input": inputs, "Output": info.output.json_type(), **enums}},
    }


def write_schema(predictor_ref: str, output: Path = SCHEMA_PATH) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(build_schema(predictor_ref), indent=2) + "\n")
    return output


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(write_schema(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) == 3 else SCHEMA_PATH))
