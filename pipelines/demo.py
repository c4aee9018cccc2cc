"""`ray job submit -- python -m pipelines.demo ...`: same arguments as `crossdim demo`."""

from crossdim.cli import pipeline_main

if __name__ == "__main__":
    pipeline_main("demo")
