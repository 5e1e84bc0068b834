"""GPT-2 conversions, installed as ``gpt2jax.convert``: ``mapping`` (the one tensor-name table,
used both ways), ``openai_tf`` (OpenAI TF checkpoints in), ``openai_export`` (out), ``hf`` and
``hf_tokenizer`` (Hugging Face directories, both ways)."""
