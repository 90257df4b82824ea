"""Benchmarks that anyone can rerun: `python -m policy_split_trl.benchmarks.step_overhead --help`."""
