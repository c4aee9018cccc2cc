"""`ray job submit -- python -m pipelines.train ...`: same arguments as `crossdim train`."""

from crossdim.cli import pipeline_main

if __name__ == "__main__":
    pipeline_main("train")
