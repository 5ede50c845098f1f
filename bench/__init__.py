"""lora_fx benchmarks: `python -m bench` (see bench/harness.py and docs/performance.md)."""
