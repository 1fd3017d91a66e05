"""Image models: timm CNNs and ViTs, torchvision classification, segmentation and detection (tiny images)."""
from __future__ import annotations

import torch
from torch import nn

from .entry import Entry, Step, adamw, register

ADAM_RULES = ("adam-step-on-host", "foreach-optimizer")
SGD_RULES = ()  # SGD with momentum and no weight decay updates in place: foreach allocates nothing more


def _images(batch: int, size: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))


def _timm(name: str, size: int = 32, optimizer: str = "adamw", **kwargs) -> Step:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    x, y = _images(2, size)
    opt = adamw(model) if optimizer == "adamw" else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Step(model, opt, x, y)


def _timm_entry(name: str, model: str, rules=ADAM_RULES, **kwargs) -> Entry:
    return register(Entry(name, "timm", lambda: _timm(model, **kwargs), rules, requires=("timm",)))


_timm_entry("timm_resnet18", "resnet18")
_timm_entry("timm_efficientnet_b0", "efficientnet_b0", rules=(*ADAM_RULES, "dropout-bool-mask"), drop_rate=0.2)
_timm_entry("timm_mobilenetv3_small", "mobilenetv3_small_100", optimizer="sgd", rules=SGD_RULES)
_timm_entry("timm_convnext_atto", "convnext_atto")
_timm_entry("timm_vit_tiny", "vit_tiny_patch16_224", rules=(*ADAM_RULES, "sdpa-cuda-kernel"), img_size=32)
_timm_entry("timm_regnetx_002", "regnetx_002", optimizer="sgd", rules=SGD_RULES)


def _torchvision(build, size: int = 32, sgd: bool = True) -> Step:
    model = build()
    x, y = _images(2, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if sgd else adamw(model)
    return Step(model, opt, x, y)


def _tv_classifiers() -> None:
    from torchvision import models

    register(Entry("tv_resnet50", "torchvision", lambda: _torchvision(lambda: models.resnet50(num_classes=10)),
                   SGD_RULES))
    register(Entry("tv_mobilenet_v3_small", "torchvision",
                   lambda: _torchvision(lambda: models.mobilenet_v3_small(num_classes=10)),
                   ("dropout-bool-mask",)))
    register(Entry("tv_shufflenet_v2", "torchvision",
                   lambda: _torchvision(lambda: models.shufflenet_v2_x0_5(num_classes=10)), SGD_RULES))
    register(Entry("tv_vit_tiny", "torchvision", lambda: _torchvision(
        lambda: models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                         mlp_dim=128, num_classes=10), sgd=False),
        (*ADAM_RULES, "sdpa-cuda-kernel")))


class _SegmentationLoss:
    """Pixel-wise cross-entropy on the 'out' map of a torchvision segmentation model."""

    def __call__(self, output, target):
        return nn.functional.cross_entropy(output["out"], target)


def _segmentation(build) -> Step:
    model = build()
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 5, (2, 64, 64))
    return Step(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), x, y, _SegmentationLoss())


def _tv_dense() -> None:
    from torchvision.models import segmentation

    register(Entry("tv_lraspp_mobilenet_v3", "torchvision", lambda: _segmentation(
        lambda: segmentation.lraspp_mobilenet_v3_large(num_classes=5, weights_backbone=None)), SGD_RULES))
    register(Entry("tv_deeplabv3_mobilenet_v3", "torchvision", lambda: _segmentation(
        lambda: segmentation.deeplabv3_mobilenet_v3_large(num_classes=5, weights_backbone=None, aux_loss=False)),
        ("dropout-bool-mask",)))
    register(Entry(
        "tv_fasterrcnn_mobilenet_v3", "torchvision", _detection, (*SGD_RULES, "selection-upper-bound"),
        notes="train mode: the model returns a dict of losses; loss_fn sums them; the emulated step keeps every "
              "proposal through nms and the box filters (upper bound): 248.25 MiB vs 221.76 MiB on cpu (1.12x)"))


def _detection() -> Step:
    from torchvision.models import detection

    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(num_classes=3, weights=None, weights_backbone=None,
                                                            min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    return Step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), (images, targets), None,
                lambda losses, _: sum(losses.values()))


_tv_classifiers()
_tv_dense()
