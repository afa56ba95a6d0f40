"""Fixtures every test module shares, defined once here: a session-scoped fixture imported into each
module would be one fixture per module (SmolLM2 loaded five times, ~45 s each on 2 cores)."""

from real_model import hotpot_examples, smollm2  # noqa: F401 (fixtures)
