"""Layer 0: what every other layer shares (docs/architecture.md): the output contract,
leads, errors, atomic files and folders, hashes, the recipe schema machinery, registries,
the bitsandbytes config builder and the run folder's layout."""
