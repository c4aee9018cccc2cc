"""`ray job submit -- python -m pipelines.evaluate ...`: same arguments as `crossdim evaluate`."""

from crossdim.cli import pipeline_main

if __name__ == "__main__":
    pipeline_main("evaluate")
