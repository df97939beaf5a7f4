"""One video on several processes (one per GPU): layouts and the context-parallel engine.

layout.py picks how the ranks split the work (the guidance batch, the token sequence);
engine.py installs that split on a loaded pipeline with diffusers' hooks and attention
dispatcher. How the rank processes are started and driven is not here.
"""
