"""File codecs with no GPT-2 knowledge: TensorFlow bundles (with CRC32C), safetensors, torch zip."""
