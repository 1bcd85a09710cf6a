"""Property tests of the readers (config, tokenizer, safetensors, GGUF); see docs/fuzzing.md."""
