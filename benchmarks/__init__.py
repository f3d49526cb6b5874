"""The benchmarks that `pyautofs bench` runs; see README.md here."""
