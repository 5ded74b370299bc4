"""Layer 7: what leaves the machine (docs/architecture.md): export folders, model cards,
verification and publishing, and packing a shipped teacher."""
