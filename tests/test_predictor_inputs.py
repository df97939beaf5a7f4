"""The inputs the three predictors share are declared three times (Cog's build reads each file
on its own) and must stay identical: name, type, bounds, default, choices and description.
Their defaults run the model as upstream's inference/cli_demo.py does."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from diffusers import CogVideoXVideoToVideoPipeline

from cogvideox_cog.devtools.openapi import build_schema

PROJECT = Path(__file__).resolve().parent.parent
PREDICTORS = ("t2v", "i2v", "v2v")
SHARED = (
    "enhance_prompt",
    "enhance_prompt_api_key",
    "negative_prompt",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "use_dynamic_cfg",
    "fps",
    "seed",
    "lora_url",
    "lora_scale",
    "speed_mode",
    "interpolate",
    "upscale",
)
OWN = {
    "t2v": {"prompt"},
    "i2v": {"prompt", "image", "convert_colour"},
    "v2v": {"prompt", "video", "strength", "convert_colour"},
}


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    return {task: build_schema(f"{PROJECT}/predict_{task}.py:Predictor") for task in PREDICTORS}


def _declaration(schema: dict, name: str) -> dict:
    """An input as the schema states it, its choices resolved, its position left out."""
    prop = {k: v for k, v in schema["components"]["schemas"]["Input"]["properties"][name].items()}
    prop.pop("x-order")
    for ref in prop.pop("allOf", []):
        prop["choices"] = schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]["enum"]
    return prop


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_input_is_declared_identically_by_every_predictor(schemas, name):
    declared = {task: _declaration(schemas[task], name) for task in PREDICTORS}
    assert declared["i2v"] == declared["t2v"]
    assert declared["v2v"] == declared["t2v"]


@pytest.mark.parametrize("task", PREDICTORS)
def test_each_predictor_has_the_shared_inputs_and_only_its_own_besides(schemas, task):
    names = set(schemas[task]["components"]["schemas"]["Input"]["properties"])
    assert names == set(SHARED) | OWN[task]


def test_a_shared_input_declared_differently_is_caught(schemas):
    drifted = {**_declaration(schemas["t2v"], "guidance_scale"), "maximum": 30.0}
    assert drifted != _declaration(schemas["i2v"], "guidance_scale")


# What cli_demo.py passes where a request leaves an input as it is: its own arguments' defaults
# (--num_inference_steps 50, --guidance_scale 6.0), diffusers' where it passes nothing (the
# empty negative prompt, video-to-video's strength), and the base model with nothing added.
# Frames, fps and dynamic CFG are left empty for the variant's own (tests/test_inputs.py).
CLI_DEMO = {
    "num_inference_steps": 50,
    "guidance_scale": 6.0,
    "negative_prompt": "",
    "strength": inspect.signature(CogVideoXVideoToVideoPipeline.__call__)
    .parameters["strength"]
    .default,
    "num_frames": None,
    "fps": None,
    "use_dynamic_cfg": None,
    "enhance_prompt": False,
    "lora_url": None,
    "speed_mode": "default",
    "interpolate": "none",
    "upscale": "none",
    "convert_colour": False,
}


@pytest.mark.parametrize("task", PREDICTORS)
def test_an_input_left_as_it_is_runs_the_model_as_upstreams_cli_demo(schemas, task):
    properties = schemas[task]["components"]["schemas"]["Input"]["properties"]
    declared = {name: properties[name].get("default") for name in CLI_DEMO if name in properties}
    assert declared == {name: CLI_DEMO[name] for name in declared}
