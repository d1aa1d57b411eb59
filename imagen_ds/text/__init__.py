"""Text encoders (T5 and the offline tiny one) and the embedding precache job."""
from imagen_ds.text.encoders import TextEncoder, expected_dim, load_encoder

__all__ = ["TextEncoder", "expected_dim", "load_encoder"]
