"""The shard group: model, paged KV cache, token budget and the engine's step loop."""
