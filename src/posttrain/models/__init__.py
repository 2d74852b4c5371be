"""Policy + tokenizer (HF id, local dir or embedded tiny base), LoRA via peft, the reference model."""
