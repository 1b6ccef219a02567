"""The embedded policy: tokenizer, chat template, model presets and checkpoints."""
