"""Backbones for extract.py: a model that maps a batch of images to one feature row each, and the preprocessing it
expects.

- torchvision classification models: the penultimate layer (the classifier's last Linear removed); weights from
  torchvision's registry, a MoCo/DINO/solo-learn checkpoint, or random.
- timm models (DINOv2, CLIP image towers, SigLIP, EVA, ...): the pooled pre-logits embedding,
  forward_head(forward_features(x), pre_logits=True); weights from the Hugging Face hub, a local file of that
  model, or random; preprocessing from the model's own data config.
A name in both libraries (resnet50) means torchvision's; timm's tagged names (resnet50.a1_in1k) are timm's.
"""
from __future__ import annotations

import collections
import difflib
import os
import pickle
from collections.abc import Callable, Mapping, Sequence

import safetensors.torch
import timm
import timm.data
import torch
import torchvision
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import logging as hf_logging
from PIL.Image import Image
from torch import nn
from torchvision import transforms as T

from humelib.runtime import HumeError, log

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEADS = ("fc", "classifier", "heads", "head")  # where torchvision models keep their classifier
# Checkpoints holding two copies of the backbone: keep the one that evaluation code uses.
PREFER, AVOID = ("encoder_q", "base_encoder", "teacher", "online"), ("encoder_k", "momentum", "target", "student")
WRAPPERS = ("state_dict", "model", "teacher", "module", "network")  # MoCo, solo-learn, DINO, timm train.py
Transform = Callable[[Image], torch.Tensor]  # preprocessing: a PIL image -> the tensor the model takes


def build_backbone(arch: str, weights: str, seed: int = 0, cifar_stem: bool = False, image_size: int | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                   ) -> tuple[nn.Module, Transform]:
    """(model, transform): model(images) -> (n, d) features, in eval mode; transform: PIL image -> tensor."""
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    if arch in torchvision_names:
        model, registry = torchvision_model(arch, weights, seed, cifar_stem)
        return model, make_transform(registry, image_size, mean, std)
    if not is_timm(arch):
        known = torchvision_names + timm.list_models() + timm.list_models(pretrained=True)
        hint = difflib.get_close_matches(arch, known, n=3)
        raise HumeError(f"--arch {arch}: neither a torchvision classification model nor a timm model"
                        + (f"; did you mean {', '.join(hint)}?" if hint else "; see timm.list_models()"))
    if cifar_stem:
        raise HumeError("--cifar_stem: only for torchvision ResNets")
    model = timm_model(arch, weights, seed, image_size)
    return model, timm_transform(model.model, image_size, mean, std)


# ---------------------------------------------------------------- torchvision

def make_transform(weights: torchvision.models.WeightsEnum | None, image_size: int | None,
                   mean: Sequence[float] | None, std: Sequence[float] | None) -> Transform:
    """The weights' own preprocessing when known and not overridden, else resize + centre crop + normalise."""
    if weights is not None and image_size is None and mean is None and std is None:
        return weights.transforms()
    preset = weights.transforms() if weights is not None else None
    return T.Compose([T.Resize(image_size or 224), T.CenterCrop(image_size or 224), T.ToTensor(),
                      T.Normalize(mean or (preset.mean if preset else IMAGENET_MEAN),
                                  std or (preset.std if preset else IMAGENET_STD))])


def torchvision_model(arch: str, weights: str = "none", seed: int = 0, cifar_stem: bool = False
                      ) -> tuple[nn.Module, torchvision.models.WeightsEnum | None]:
    """A torchvision model that returns penultimate features; returns (model, torchvision weights or None)."""
    registry = None
    if weights != "none" and not os.path.isfile(weights):
        enum = torchvision.models.get_model_weights(arch)
        try:
            registry = enum.verify(weights)
        except KeyError:
            raise HumeError(f"--weights {weights}: neither a file nor a weights name of {arch} (names: "
                            f"{', '.join(w.name for w in enum)}, DEFAULT; or none)") from None
    torch.manual_seed(seed)  # random init (--weights none, --cifar_stem) is reproducible
    try:
        model = torchvision.models.get_model(arch, weights=registry)
    except OSError as e:  # no network and not in torch's cache
        raise HumeError(f"--weights {weights}: not in torch's cache ({torch.hub.get_dir()}/checkpoints) and "
                        f"cannot be downloaded ({e}); copy {registry.url} there or pass a file") from None
    if cifar_stem:
        if not isinstance(model, torchvision.models.ResNet):
            raise HumeError(f"--cifar_stem: only for ResNets, not {arch}")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=2, bias=False)
        model.maxpool = nn.Identity()
    head = strip_head(model, arch)
    if registry is None and weights != "none":
        load_checkpoint(model, weights, head, arch)
    return model.eval(), registry


def strip_head(model: nn.Module, arch: str) -> str:
    """Replace the classifier's last Linear by Identity, so the model outputs the layer before it.
    Returns the removed layer's state_dict prefix (e.g. "fc.", "classifier.6.", "heads.head.")."""
    for name in HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            setattr(model, name, nn.Identity())
            return name + "."
        linears = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)] if head is not None else []
        if linears:
            parent, _, leaf = linears[-1].rpartition(".")
            setattr(head.get_submodule(parent), leaf, nn.Identity())
            return f"{name}.{linears[-1]}."
    raise HumeError(f"--arch {arch}: no linear classifier head found ({'/'.join(HEADS)}); pick another architecture")


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a torch checkpoint, unwrapped from the usual training wrappers."""
    if path.endswith(".safetensors"):
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # SafetensorError, truncated file
            raise HumeError(f"--weights {path}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never runs pickled code
    except pickle.UnpicklingError:
        raise HumeError(f"--weights {path}: holds Python objects besides tensors; re-save only its weights, "
                        "e.g. torch.save(ckpt['state_dict'], 'clean.pth')") from None
    except Exception as e:
        raise HumeError(f"--weights {path}: cannot be read as a torch checkpoint ({type(e).__name__})") from None
    for key in WRAPPERS:
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
    return {k: v for k, v in ckpt.items() if torch.is_tensor(v)} if isinstance(ckpt, dict) else {}


def load_checkpoint(model: nn.Module, path: str, head: str, arch: str) -> None:
    """Load a backbone from a checkpoint file whose keys may carry a wrapper prefix; fail on any mismatch."""
    tensors, own = read_tensors(path), model.state_dict()
    prefix = best_prefix(tensors, own)
    if prefix is None:
        raise HumeError(f"--weights {path}: none of its tensors fits --arch {arch}; "
                        "is it a checkpoint of another architecture?")
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    n_head = sum(k.startswith(head) for k in sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(head)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    reshaped = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own
                and v.shape != own[k].shape]
    modules = {k.split(".")[0] for k in own}
    unexpected = [k for k in sd if k not in own]
    foreign = [k for k in unexpected if k.split(".")[0] in modules]  # extra blocks inside the model's own modules
    if missing or reshaped or foreign:
        stem = any(r.startswith("conv1.weight") for r in reshaped)  # CIFAR ResNets have a 3x3 first conv
        raise HumeError(f"--weights {path} does not fit --arch {arch}: {len(reshaped)} tensors of other shapes"
                        f"{eg(reshaped)}, {len(missing)} missing{eg(missing)}, {len(foreign)} extra{eg(foreign)}; "
                        "is it a checkpoint of another architecture" + ("? (add --cifar_stem)" if stem else "?"))
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    log(f"loaded {len(sd) - len(unexpected)} tensors from {path} (prefix '{prefix}' stripped); ignored "
        f"{n_head} classifier-head and {len(tensors) - len(sd) - n_head} other tensors; missing: none; "
        f"unexpected: {len(unexpected)}{eg(unexpected)}")


def best_prefix(tensors: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str | None:
    """The key prefix whose removal matches most of the model's keys (ties: PREFER over AVOID, shortest)."""
    hits = collections.Counter(k[:i] for k in tensors for i in [0] + [j + 1 for j, c in enumerate(k) if c == "."]
                               if k[i:] in own)
    if not hits:
        return None
    return max(hits, key=lambda p: (hits[p], any(w in p for w in PREFER), -any(w in p for w in AVOID), -len(p)))


def eg(keys: Sequence[str]) -> str:
    return f" (e.g. {', '.join(keys[:3])})" if keys else ""


# ---------------------------------------------------------------- timm

class PreLogits(nn.Module):
    """A timm model evaluated up to its pooled pre-logits embedding: the input of its classifier (or, for CLIP
    towers, of the projection timm keeps as `head`). The whole model is kept, so its state_dict loads strictly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def is_timm(arch: str) -> bool:
    """A timm architecture, bare (vit_small_patch14_dinov2) or with a pretrained tag (.lvd142m) timm knows."""
    return arch in timm.list_models(pretrained=True) or ("." not in arch and timm.is_model(arch))


def timm_model(arch: str, weights: str, seed: int, image_size: int | None) -> PreLogits:
    """PreLogits of a timm model with weights "pretrained" (the HF hub, cached), "none" (random) or a file."""
    if weights not in ("pretrained", "none") and not os.path.isfile(weights):
        raise HumeError(f"--weights {weights}: for timm's {arch} give pretrained, none or a .safetensors/.pth file")
    torch.manual_seed(seed)  # random init is reproducible
    if weights == "pretrained":
        cfg = timm.models.get_pretrained_cfg(arch)  # a bare name: its default tag's
        if not (cfg and (cfg.hf_hub_id or cfg.url)):
            raise HumeError(f"--weights pretrained: timm has no pretrained weights for {arch} (it would silently "
                            "initialise it at random); pick a tagged name from timm.list_models(pretrained=True)")
        source = f"huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        cache = hf_constants.HF_HUB_CACHE if cfg.hf_hub_id else torch.hub.get_dir()
        log(f"{arch}: pretrained weights from {source}, cached in {cache} (downloaded on first use)")
        hf_logging.set_verbosity_error()  # one line below, not one warning per retry
        try:
            model = create_timm(arch, True, image_size)
        except OSError as e:  # no network and not cached (huggingface_hub's LocalEntryNotFoundError, URLError)
            raise HumeError(f"--weights pretrained: {arch} is not in {cache} and cannot be downloaded (no network? "
                            f"{type(e).__name__}); on a machine with network run this once, or fetch its weights "
                            f"from {source} (model.safetensors) and pass them as --weights FILE") from None
    else:
        model = create_timm(arch, False, image_size)
    if weights not in ("pretrained", "none"):
        load_timm_file(model, weights, arch)
    return PreLogits(model.eval())


def create_timm(arch: str, pretrained: bool, image_size: int | None) -> nn.Module:
    if image_size:  # ViTs: interpolate the position embeddings to other sizes at run time; weights keep their shape
        try:
            return timm.create_model(arch, pretrained=pretrained, dynamic_img_size=True)
        except TypeError:  # convolutional models take any size as they are
            pass
    return timm.create_model(arch, pretrained=pretrained)


def classifier_keys(model: nn.Module) -> set[str]:
    """The state_dict keys of a timm model's classifier (what a file saved with num_classes=0 lacks)."""
    head = model.get_classifier()
    names = [name for name, module in model.named_modules() if module is head]
    return {f"{names[0]}.{k}" for k in head.state_dict()} if names and names[0] else set()


def load_timm_file(model: nn.Module, path: str, arch: str) -> None:
    """Load a state_dict of exactly this timm model (as timm saves it, e.g. the hub's model.safetensors), with or
    without its classifier: feature checkpoints are usually saved from num_classes=0 models, and the features
    (pre-logits) never use the classifier."""
    sd, own = read_tensors(path), model.state_dict()
    head = classifier_keys(model)
    if head and not head & sd.keys() and own.keys() - head <= sd.keys():  # headless: drop ours too
        model.reset_classifier(0)
        own = model.state_dict()
        log(f"{path} holds no classifier (saved with num_classes=0): loaded without one")
    bad = [f"{k} has shape {tuple(sd[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in own.items()
           if k in sd and sd[k].shape != v.shape]
    bad += [f"{k} is missing from the file" for k in own if k not in sd]
    bad += [f"{k} is not in the model" for k in sd if k not in own]
    if bad:
        raise HumeError(f"--weights {path} is not a state_dict of timm's {arch} ({len(bad)} mismatches; first: "
                        f"{bad[0]}); is it a checkpoint of another architecture?")
    model.load_state_dict(sd, strict=True)
    log(f"loaded {len(sd)} tensors from {path}")


def timm_transform(model: nn.Module, image_size: int | None, mean: Sequence[float] | None,
                   std: Sequence[float] | None) -> Transform:
    """The model's own preprocessing (resolution, interpolation, crop, mean/std), with the flags' overrides."""
    overrides = {"input_size": (3, image_size, image_size) if image_size else None, "mean": mean, "std": std}
    config = timm.data.resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    log("preprocessing: " + ", ".join(f"{k} {v}" for k, v in config.items()))
    return timm.data.create_transform(**config)
