"""`ray job submit -- python -m pipelines.tune ...`: same arguments as `crossdim tune`."""

from crossdim.cli import pipeline_main

if __name__ == "__main__":
    pipeline_main("tune")
