"""Tools for development and tests, not used by a served prediction: tiny random models, the
CPU demo, and the OpenAPI document `cog build` would write."""
