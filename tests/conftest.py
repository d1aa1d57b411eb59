"""Test environment: CPU DeepSpeed, offline W&B, a shared cache for DeepSpeed's compiled ops."""
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
