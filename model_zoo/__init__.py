"""Tools that make models for tests and benchmarks: seeded random-weight builders,
tokenizer training, and the SmolLM2 GGUF conversion. Nothing here runs while serving."""
