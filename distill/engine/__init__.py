"""Layer 5: training (docs/architecture.md): the Accelerate loop, checkpoints, recipe ->
models and jobs, and the teacher-output cache."""
