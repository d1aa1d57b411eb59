"""imagen_ds: train the Imagen text-to-image cascade on DeepSpeed."""

__version__ = "0.1.0"
