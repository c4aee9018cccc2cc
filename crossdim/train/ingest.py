"""Ingest: the fold's Ray Datasets -> each worker's decoded cases.

Every Ray Dataset is cut into one-row blocks and handed to the workers by ONE
`streaming_split(num_workers, equal=False)` (`CaseSplit`): Ray's splitter gives each next block
to the worker holding the fewest rows, so every case reaches exactly one worker and shares
differ by at most one case. (Ray's default DataConfig uses `equal=True`, which drops up to
num_workers - 1 cases; one dataset iterator per worker would start one Ray Data execution per
worker, which deadlocks when only a CPU or so is left for Ray Data.)

Workers stream their share once (`iter_rows`) and keep it decoded in memory: cases are small
and training draws many patches from each.
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig


class CaseSplit(DataConfig):
    """Split every dataset over the workers without dropping rows (see the module docstring)."""

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                output[rank][name] = split
        return output


def one_case_per_block(ds: Any) -> Any:
    """Blocks of one row each, so the splitter can balance cases (not shard files).

    The stream's own progress bars are off: each worker reads its cases once per job, and a bar
    per operator from the split coordinator buries the per-epoch training log that shows progress."""
    out = ds.repartition(target_num_rows_per_block=1)
    out.context.enable_progress_bars = False
    return out


def load_cases(name: str, keep_dtype: bool = False) -> list[Any]:
    """This worker's share of dataset `name`, streamed from Ray Data and decoded, sorted by id.

    With `keep_dtype` the images stay in the shards' dtype (float16 by default): the training
    sampler casts each patch to float32 as it cuts it, so the cases a worker holds take half the
    memory."""
    import ray.train

    from crossdim.data.shards import decode_row

    shard = ray.train.get_dataset_shard(name)
    return sorted((decode_row(row, keep_dtype) for row in shard.iter_rows()), key=lambda c: c.id)
