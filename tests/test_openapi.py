"""The generated input schema says exactly what the predictors' Input(...) declarations say.

`cog build` reads those declarations statically, so the test does too: it parses the source
with `ast` and compares every literal bound, default and choice with the schema.
"""

import ast
import subprocess
import sys

import pytest

from cogvideox_cog.devtools.openapi import build_schema
from tests.conftest import PROJECT

PREDICTORS = ["predict_t2v.py", "predict_i2v.py", "predict_v2v.py"]
SCHEMA_KEYS = {"ge": "minimum", "le": "maximum", "default": "default", "choices": "enum"}
LENGTH_AND_TEXT_KEYS = {
    "min_length": "minLength",
    "max_length": "maxLength",
    "regex": "pattern",
    "description": "description",
}


def _declared_inputs(source_file: str) -> dict[str, dict]:
    tree = ast.parse((PROJECT / source_file).read_text())
    run = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run")
    declared = {}
    args = run.args.args[-len(run.args.defaults) :]
    for arg, default in zip(args, run.args.defaults, strict=True):
        assert isinstance(default, ast.Call) and default.func.id == "Input", arg.arg
        # literal_eval fails on anything that is not a literal, as cog build's parser would.
        declared[arg.arg] = {kw.arg: ast.literal_eval(kw.value) for kw in default.keywords}
    return declared


@pytest.mark.parametrize("source_file", PREDICTORS)
def test_every_declared_input_is_in_the_schema_in_order(source_file):
    schema = build_schema(f"{PROJECT / source_file}:Predictor")["components"]["schemas"]["Input"]
    declared = _declared_inputs(source_file)
    assert list(schema["properties"]) == list(declared)
    assert [p["x-order"] for p in schema["properties"].values()] == list(range(len(declared)))


@pytest.mark.parametrize("source_file", PREDICTORS)
def test_every_literal_bound_default_and_choice_is_in_the_schema(source_file):
    document = build_schema(f"{PROJECT / source_file}:Predictor")
    properties = document["components"]["schemas"]["Input"]["properties"]
    for name, keywords in _declared_inputs(source_file).items():
        prop = properties[name]
        for keyword, schema_key in SCHEMA_KEYS.items():
            if keyword == "default" and "default" in keywords and keywords["default"] is None:
                continue  # an empty default: the next test
            if keywords.get(keyword) is None:
                assert schema_key not in prop, (name, schema_key)
            elif keyword == "choices":
                enum = document["components"]["schemas"][name]["enum"]
                assert enum == keywords["choices"], name
            else:
                assert prop[schema_key] == keywords[keyword], (name, keyword)


@pytest.mark.parametrize("source_file", PREDICTORS)
def test_inputs_without_default_are_required_and_empty_defaults_nullable(source_file):
    schema = build_schema(f"{PROJECT / source_file}:Predictor")["components"]["schemas"]["Input"]
    for name, keywords in _declared_inputs(source_file).items():
        has_default = "default" in keywords
        if not has_default:
            assert name in schema["required"]
        elif keywords["default"] is None:
            assert schema["properties"][name].get("nullable") is True, name


@pytest.mark.parametrize("source_file", PREDICTORS)
def test_an_empty_default_is_written_as_null_as_cog_build_writes_it(source_file):
    """cog build's document has `"default": null` for each `Optional[...] = Input(default=None)`
    (Cog's own integration test static_schema_secret_optional says so); the one served by
    script/serve and the tests must be that document."""
    properties = build_schema(f"{PROJECT / source_file}:Predictor")["components"]["schemas"]
    properties = properties["Input"]["properties"]
    empty = [
        name for name, kw in _declared_inputs(source_file).items() if kw.get("default", 0) is None
    ]
    assert empty, "each predictor has inputs whose default is empty (seed, fps, ...)"
    for name in empty:
        assert "default" in properties[name] and properties[name]["default"] is None, name


@pytest.mark.parametrize(
    "source_file, name", [("predict_i2v.py", "image"), ("predict_v2v.py", "video")]
)
def test_the_picture_or_clip_is_a_required_string_not_a_file(source_file, name):
    """A string, so Cog passes the URL on as it is instead of downloading it unbounded."""
    schema = build_schema(f"{PROJECT / source_file}:Predictor")["components"]["schemas"]
    assert schema["Input"]["properties"][name]["type"] == "string"
    assert "format" not in schema["Input"]["properties"][name]
    assert name in schema["Input"]["required"]


def test_output_is_a_single_file_uri():
    output = build_schema(f"{PROJECT / 'predict_t2v.py'}:Predictor")["components"]["schemas"]
    assert output["Output"] == {"title": "Output", "type": "string", "format": "uri"}


def test_the_schema_writer_answers_help_with_its_usage(tmp_path):
    """--help was taken for a predictor reference: a traceback, no usage."""
    done = subprocess.run(
        [sys.executable, "-m", "cogvideox_cog.devtools.openapi", "--help"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Usage: python -m cogvideox_cog.devtools.openapi" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("source_file", PREDICTORS)
def test_every_declared_length_bound_and_description_is_in_the_schema(source_file):
    """Cog's server validates against the document: a prompt over max_length must be refused."""
    properties = build_schema(f"{PROJECT / source_file}:Predictor")["components"]["schemas"]
    properties = properties["Input"]["properties"]
    declared = _declared_inputs(source_file)
    assert any("max_length" in keywords for keywords in declared.values())
    for name, keywords in declared.items():
        for keyword, schema_key in LENGTH_AND_TEXT_KEYS.items():
            assert properties[name].get(schema_key) == keywords.get(keyword), (name, keyword)


def test_an_inputs_title_is_its_name_in_words_as_cog_build_writes_it():
    properties = build_schema(f"{PROJECT / 'predict_t2v.py'}:Predictor")["components"]["schemas"]
    assert properties["Input"]["properties"]["negative_prompt"]["title"] == "Negative Prompt"


def test_the_document_lists_every_operation_cogs_server_answers():
    """The fuzzer (tests/test_schema_fuzz.py) and other clients find only what is listed."""
    paths = build_schema(f"{PROJECT / 'predict_t2v.py'}:Predictor")["paths"]
    operations = {(path, method) for path, item in paths.items() for method in item}
    assert operations == {
        ("/", "get"),
        ("/health-check", "get"),
        ("/predictions", "post"),
        ("/predictions/{prediction_id}", "put"),
        ("/predictions/{prediction_id}/cancel", "post"),
    }


def test_every_prediction_operation_answers_bad_input_with_a_validation_error():
    paths = build_schema(f"{PROJECT / 'predict_t2v.py'}:Predictor")["paths"]
    for path, method in (("/predictions", "post"), ("/predictions/{prediction_id}", "put")):
        responses = paths[path][method]["responses"]
        assert set(responses) == {"200", "422"}, path
        assert responses["422"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/HTTPValidationError"
        }


def test_a_choice_input_is_validated_against_its_enumeration():
    """The property refers to its enum component; without the reference any string passes."""
    schemas = build_schema(f"{PROJECT / 'predict_t2v.py'}:Predictor")["components"]["schemas"]
    speed_mode = schemas["Input"]["properties"]["speed_mode"]
    assert speed_mode["allOf"] == [{"$ref": "#/components/schemas/speed_mode"}]
    assert schemas["speed_mode"]["enum"] == ["default", "fast", "faster"]


def test_a_prediction_response_refers_to_the_input_and_output_it_carries():
    """Cog's server answers a prediction with its input and output: a client that reads the
    response through the document learns their fields from these references."""
    schemas = build_schema(f"{PROJECT / 'predict_t2v.py'}:Predictor")["components"]["schemas"]
    for component in ("PredictionResponse", "PredictionRequest"):
        properties = schemas[component]["properties"]
        assert properties["input"] == {"$ref": "#/components/schemas/Input"}, component
    assert schemas["PredictionResponse"]["properties"]["output"] == {
        "$ref": "#/components/schemas/Output"
    }


def test_the_document_is_openapi_3_0_whose_nullable_its_inputs_use():
    """`nullable` is an OpenAPI 3.0 keyword; 3.1 dropped it for JSON Schema's type lists, so
    a 3.1 reader would take an empty default's `null` as off the schema."""
    document = build_schema(f"{PROJECT / 'predict_t2v.py'}:Predictor")
    properties = document["components"]["schemas"]["Input"]["properties"].values()
    assert any(prop.get("nullable") for prop in properties)
    assert document["openapi"] == "3.0.2"
