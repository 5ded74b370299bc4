"""Layer 4: measurements (docs/architecture.md): classification metrics under the PTB-XL
protocol, footprint (size, memory, latency), scoring on the folds, a run's results."""
