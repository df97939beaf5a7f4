"""Prompt enhancement (enhance_prompt): a language model rewrites a short prompt into the
long visual description CogVideoX was trained on. enhance.py picks the backend and bounds
the rewrite; instruction.py is what the model is asked; local.py and endpoint.py run it."""
