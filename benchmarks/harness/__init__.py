"""The accuracy harness: seeded tasks, teacher forcing through decode steps, and
worker-side probes. Evaluation code, kept out of the package that `vllm serve` loads."""
