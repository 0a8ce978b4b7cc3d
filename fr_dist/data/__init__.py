"""Data: MXNet RecordIO (read/write), decode, synthetic identities, .bin pairs, sampler, loaders."""

from fr_dist.data.recordio import (
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    open_recordio,
    write_dataset,
)

__all__ = [
    "IRHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "open_recordio",
    "write_dataset",
    "make_synthetic_dataset",
    "build_train_loader",
    "ShardedSampler",
    "read_bin",
    "write_bin",
]


def __getattr__(name):  # lazy: keep `import fr_dist.data` light
    if name == "make_synthetic_dataset":
        from fr_dist.data.synthetic import make_synthetic_dataset

        return make_synthetic_dataset
    if name == "build_train_loader":
        from fr_dist.data.loader import build_train_loader

        return build_train_loader
    if name == "ShardedSampler":
        from fr_dist.data.sampler import ShardedSampler

        return ShardedSampler
    if name in ("read_bin", "write_bin"):
        from fr_dist.data import pairs

        return getattr(pairs, name)
    raise AttributeError(name)
