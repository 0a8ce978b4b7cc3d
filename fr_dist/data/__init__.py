"""Data: MXNet RecordIO (read/write), decode, folder packer, synthetic identities, .bin pairs,
resumable sharded sampler, torch and DALI loaders.

    from fr_dist.data import open_recordio
    rec = open_recordio("path/train.rec")       # train.idx beside it, or the index is rebuilt
    rec.layout, rec.num_images, rec.num_classes, rec.image_keys
    header, payload = rec.read(key); rec.label(key); rec.decode(key)

Heavy pieces (torch loader, DALI, synthetic generator) are imported lazily.
"""

from fr_dist.data.recordio import (
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    open_recordio,
    write_dataset,
    write_recordio,
)

__all__ = [
    "IRHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "open_recordio",
    "write_dataset",
    "write_recordio",
    "make_synthetic_dataset",
    "demo_dataset_spec",
    "build_train_loader",
    "ShardedSampler",
    "read_bin",
    "write_bin",
    "make_pairs_bin",
    "pack_folder",
]

_LAZY = {
    "make_synthetic_dataset": "fr_dist.data.synthetic",
    "demo_dataset_spec": "fr_dist.data.synthetic",
    "build_train_loader": "fr_dist.data.loader",
    "ShardedSampler": "fr_dist.data.sampler",
    "read_bin": "fr_dist.data.pairs",
    "write_bin": "fr_dist.data.pairs",
    "make_pairs_bin": "fr_dist.data.pairs",
    "pack_folder": "fr_dist.data.pack",
}


def __getattr__(name):  # lazy: keep `import fr_dist.data` light (no torch, no cv2)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fr_dist.data' has no attribute {name!r}")
