"""One video on several processes (one per GPU): layouts, the context-parallel engine, and
the rank processes that run it.

layout.py picks how the ranks split the work (the guidance batch, the token sequence);
engine.py installs that split on a loaded pipeline with diffusers' hooks and attention
dispatcher. gpus.py reads COGVIDEOX_GPUS and starts one generator or a group; group.py is
the Cog worker's side of the group, ranks.py a rank process, protocol.py their messages,
and lifetime.py ends a rank with the worker.
"""
