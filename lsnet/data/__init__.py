"""Data: the synthetic COCO generator, the Arrow shard format and its readers, training augmentations.

Submodules are imported on use (``from lsnet.data.shards import ShardDataset``) so that
``lsnet synth`` does not pay for pyarrow/torch imports it does not need.
"""
