"""Load generation against a running OpenAI-compatible server: ``dsv32 bench serve``, as ``vllm bench serve``."""
