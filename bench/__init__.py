"""crossdim benchmarks against the baselines users would pick instead (`make bench`).

Each benchmark runs both sides in one invocation, on the same data and settings, and reports
ratios; see bench/README.md and the latest figures in bench/RESULTS.md.
"""
