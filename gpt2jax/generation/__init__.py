"""Text generation: ``host`` (prompts, batching, streaming), ``decoding`` (the compiled loop over a
KV cache) and ``sampling`` (temperature, top-k, top-p filters)."""
