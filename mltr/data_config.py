"""How a run's datasets reach the Ray Train workers (a module of its own: Ray Train's controller and
DatasetManager import it to unpickle the run's data config, and need neither torch nor MLflow)."""

from __future__ import annotations

import ray.train


class SplitDataConfig(ray.train.DataConfig):
    """How the datasets reach the workers: ``train`` split equally, the others so every row is read once.

    DDP needs the same number of steps on every worker, so the training stream is split with
    ``equal=True`` (as Ray Train does for every dataset). Evaluation needs every row once, and
    ``equal=True`` drops up to ``world_size - 1`` of them: the other datasets are split with
    ``equal=False``; their metrics are gathered across workers, whatever each worker got.
    """

    def __init__(self, equal: tuple[str, ...] = ("train",)):
        super().__init__(datasets_to_split=list(equal))
        self.equal = frozenset(equal)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = super().configure(
            {name: ds for name, ds in datasets.items() if name in self.equal},
            world_size,
            worker_handles,
            worker_node_ids,
            **kwargs,
        )
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if name in self.equal:
                continue
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank][name] = split
        return output
