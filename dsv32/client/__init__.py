"""Clients of a running OpenAI-compatible server: ``dsv32 chat`` (``chat``) and the stream reader it shares with
``dsv32 bench serve`` (``sse``)."""
