"""`ray job submit -- python -m pipelines.synth ...`: same arguments as `crossdim synth`."""

from crossdim.cli import pipeline_main

if __name__ == "__main__":
    pipeline_main("synth")
