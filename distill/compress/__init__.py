"""Layer 6: compression (docs/architecture.md): bitsandbytes quantization plans and the
conversion of a saved student."""
