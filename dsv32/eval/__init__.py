"""Accuracy evaluation of a running OpenAI-compatible server (``dsv32 eval gsm8k``, ``dsv32 eval demo``)."""
