"""raycache: federated fine-tuning of CLIP (CacheFL, FedCLIP, FLoRA) on Ray, tracked in MLflow."""

__version__ = "0.1.0"
