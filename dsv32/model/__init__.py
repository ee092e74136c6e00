"""The DeepSeek-V3 / V3.2 network in PyTorch: its layers, the paged KV-cache tensors, and the checkpoint loader."""
