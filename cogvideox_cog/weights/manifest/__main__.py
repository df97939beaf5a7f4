"""`python -m cogvideox_cog.weights.manifest DIR VARIANT [SOURCE ...]`.

A module of its own: the weights package imports the manifest code, and runpy warns when the
module it runs as __main__ was imported already (and runs a second copy of it).
"""

from . import main

main()
