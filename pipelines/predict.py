"""`ray job submit -- python -m pipelines.predict ...`: same arguments as `crossdim predict`."""

from crossdim.cli import pipeline_main

if __name__ == "__main__":
    pipeline_main("predict")
