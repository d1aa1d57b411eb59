"""Data: the shard format, shard preparation, synthetic demo data and the training loader."""
from imagen_ds.data.loader import REASONS, TrainLoader, make_train_loader

__all__ = ["REASONS", "TrainLoader", "make_train_loader"]
