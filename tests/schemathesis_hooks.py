"""schemathesis hooks for tests/test_schema_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A valid request runs the model: at the default 50 steps that is about 20 s on the tiny model,
at the allowed 500 several minutes. So a valid (or absent) num_inference_steps is sent as at
most 2; a value that breaks the schema is sent as generated. The bounds themselves are tested
row by row in tests/test_bad_inputs.py.
"""

import schemathesis

FUZZ_STEPS = 2


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    inputs = case.body.get("input") if isinstance(case.body, dict) else None
    if isinstance(inputs, dict):
        steps = inputs.get("num_inference_steps", FUZZ_STEPS)
        if type(steps) is int and FUZZ_STEPS <= steps <= 500:
            inputs["num_inference_steps"] = FUZZ_STEPS
