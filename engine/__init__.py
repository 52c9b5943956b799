"""Model execution: forward passes, paged KV cache, attention backends, sampler."""
