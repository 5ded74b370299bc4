"""Layer 8: ``ecg-distill run`` (docs/architecture.md): the pipeline of stages over a run
folder, one module per stage under :mod:`distill.run.stages`."""
