"""Shared machinery behind the CogVideoX Cog predictors.

Weights come only from setup()'s own download into a local directory; switch off every hub
lookup before diffusers or transformers are imported, since they read these at import time.
"""

import os

for _name in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
):
    os.environ[_name] = "1"
