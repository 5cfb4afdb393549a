"""Tools that help test, demonstrate and benchmark Keel: not part of the runtime package.

* ``tools.mockprovider`` — a mock LLM provider speaking OpenAI, Azure OpenAI, Anthropic,
  Gemini, Vertex AI and Bedrock formats (JSON and streams), with knobs for usage, broken
  streams, split events and errors. ``python -m tools.mockprovider --port 8081``.
* ``tools.demo`` — the narrated calls of ``make demo``.
"""
