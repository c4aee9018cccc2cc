"""Datasets: layout readers, synthetic data, preprocessing, shards.

`open_shards` and `iter_cases` are imported lazily so that `import crossdim.data` stays light.
"""

__all__ = ["open_shards", "iter_cases", "read_manifest"]


def __getattr__(name):
    if name in __all__:
        from crossdim.data import shards

        return getattr(shards, name)
    raise AttributeError(name)
