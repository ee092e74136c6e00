"""The engine: requests in, token deltas out. Scheduling, the paged-cache block pool, the model runner and sampler, and
the clients that hold the engine (in this process, or in an engine-core process of its own)."""
