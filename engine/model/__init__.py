"""The Qwen3 decoder and what it is made of: config, layers, attention, KV cache, frozen weights,
LoRA, log-probs, weight files and the chat tokenizer."""
