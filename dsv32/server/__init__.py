"""The OpenAI-compatible HTTP server: routes, the request boundary, the wire format, and ``dsv32 run-batch``."""
