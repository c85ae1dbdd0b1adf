"""The CPU benchmark suite (`make bench`, `python benchmarks/run_all.py`); see BENCHMARKS.md."""
