"""`ray job submit -- python -m pipelines.preprocess ...`: same arguments as `crossdim preprocess`."""

from crossdim.cli import pipeline_main

if __name__ == "__main__":
    pipeline_main("preprocess")
