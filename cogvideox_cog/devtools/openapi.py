"""Write the OpenAPI document `cog build` would put in `.cog/openapi_schema.json`.

Cog's server validates inputs only against that file and serves it as /openapi.json, and only
`cog build` (a Go static analyser, not available without Docker) writes it. Without it a
locally served predictor accepts anything and describes no operation. This reads the same
declarations through cog's own Python inspector and lays out the whole document as the build
does (its paths, Input, Output and the request, response and error components), so
`script/serve` and the tests refuse bad input exactly as a deployed image does, and
schema-driven clients find every operation. One addition: `PUT /predictions/{prediction_id}`,
which Cog's server answers but the build's document leaves out.

Usage: python -m cogvideox_cog.devtools.openapi predict_t2v.py:Predictor [OUTPUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import cog
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
        elif nullable:
            prop["default"] = None  # the build writes an empty default out: "default": null
        else:
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


def _json(schema_ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}


_ANY_JSON = {"application/json": {"schema": {}}}
_VALIDATION_ERROR = {"description": "Validation Error", "content": _json("HTTPValidationError")}
_PREDICTION_ID = {
    "required": True,
    "schema": {"title": "Prediction Id", "type": "string"},
    "name": "prediction_id",
    "in": "path",
}


_STRING = {"type": "string"}
_TIMESTAMP = {"type": "string", "format": "date-time"}
# The components every Cog predictor's document has, whatever its inputs.
_PREDICTION_COMPONENTS: dict[str, Any] = {
    "PredictionRequest": {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {
            "id": {"title": "Id", **_STRING},
            "input": {"$ref": "#/components/schemas/Input"},
        },
    },
    "PredictionResponse": {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", **_STRING},
            "version": {"title": "Version", **_STRING},
            "created_at": {"title": "Created At", **_TIMESTAMP},
            "started_at": {"title": "Started At", **_TIMESTAMP},
            "completed_at": {"title": "Completed At", **_TIMESTAMP},
            "status": {"title": "Status", **_STRING},
            "error": {"title": "Error", **_STRING},
            "logs": {"title": "Logs", **_STRING},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    },
    "Status": {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    },
    "HTTPValidationError": {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {
                "title": "Detail",
                "type": "array",
                "items": {"$ref": "#/components/schemas/ValidationError"},
            }
        },
    },
    "ValidationError": {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    },
}


def _components(inputs: dict[str, Any], output: dict[str, Any], enums: dict[str, Any]) -> dict:
    return {"Input": inputs, "Output": output, **enums, **_PREDICTION_COMPONENTS}


def _paths() -> dict[str, Any]:
    def get(summary: str, operation_id: str) -> dict[str, Any]:
        ok = {"description": "Successful Response", "content": _ANY_JSON}
        return {"get": {"summary": summary, "operationId": operation_id, "responses": {"200": ok}}}

    predicted = {
        "200": {"description": "Successful Response", "content": _json("PredictionResponse")},
        "422": _VALIDATION_ERROR,
    }
    request = {"content": _json("PredictionRequest")}
    return {
        "/": get("Root", "root__get"),
        "/health-check": get("Healthcheck", "healthcheck_health_check_get"),
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": request,
                "responses": predicted,
            }
        },
        "/predictions/{prediction_id}": {
            "put": {
                "summary": "Predict Idempotent",
                "description": "Run a single prediction on the model, under this id",
                "operationId": "predict_idempotent_predictions__prediction_id__put",
                "parameters": [_PREDICTION_ID],
                "requestBody": request,
                "responses": predicted,
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [_PREDICTION_ID],
                "responses": {
                    "200": {"description": "Successful Response", "content": _ANY_JSON},
                    "422": _VALIDATION_ERROR,
                },
            }
        },
    }


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
        "info": {"title": "Cog", "version": cog.__version__},
        "paths": _paths(),
        "components": {"schemas": _components(inputs, info.output.json_type(), enums)},
    }


def write_schema(predictor_ref: str, output: Path = SCHEMA_PATH) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(build_schema(predictor_ref), indent=2) + "\n")
    return output


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    print(write_schema(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) == 3 else SCHEMA_PATH))
