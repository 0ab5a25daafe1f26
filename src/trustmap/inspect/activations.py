"""Activation extraction: any layers of any model, over a dataset, in one batched pass.

Everything in :mod:`trustmap.inspect` that reads hidden layers (feature maps, unit rates,
embeddings, network dissection, influence) goes through this module, and so can a later
method that needs cached activations (concept vectors, similar cases).

Layers are named as in ``model.named_modules()``. ``"name"`` is the module's output;
``"name:input"`` is its (first) input, so ``"fc:input"`` is the penultimate feature vector
of a classifier whose last layer is ``fc``. :func:`penultimate_layer` finds that name for
any model (the input of the last ``nn.Linear`` that runs; for a fully convolutional model
the globally pooled last feature map).

>>> acts = extract(model, images, ["features.block4", "fc:input"], batch_size=64)
>>> acts["fc:input"].shape  # (N, 256)
>>> for batch in iter_activations(model, dataset, ["features.block4"]):
...     batch.index, batch.activations["features.block4"]  # one batch at a time

Every pass runs the model in eval mode (module flags restored afterwards), registers one
hook per requested layer for the whole pass and removes all of them when the pass ends,
is abandoned or raises; the caller's tensors are never modified.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.hooks import hook_handles, model_guard
from trustmap.errors import InputError, InputTypeError

__all__ = [
    "ActivationBatch",
    "Activations",
    "LayerInfo",
    "as_images",
    "batch_of_one",
    "extract",
    "iter_activations",
    "layer_table",
    "penultimate_layer",
    "require_spatial",
    "resolve_layer",
]

INPUT_SUFFIX = ":input"
REDUCTIONS = ("none", "mean", "max", "flatten")

Reduce = str | Callable[[torch.Tensor], torch.Tensor] | None


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a model as seen in one forward pass.

    ``shape`` is the output's shape per sample (without the batch axis); ``spatial`` is
    True when it is a feature map ``(K, *s)`` with the input's spatial rank; ``calls``
    counts how often the module ran (a reused module is read at its last call).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    spatial: bool
    params: int
    calls: int


@dataclass(frozen=True)
class ActivationBatch:
    """One batch of :func:`iter_activations`: dataset positions, inputs, model outputs and
    the activations of every requested layer (detached unless the pass keeps gradients)."""

    index: np.ndarray
    inputs: torch.Tensor
    outputs: torch.Tensor | None
    activations: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Activations:
    """Activations of several layers over a dataset (:func:`extract`).

    ``values[name]`` is ``(N, ...)`` on the CPU (reduced as asked); ``outputs`` the
    model's outputs ``(N, ...)`` (None when the passes stopped after the layers);
    ``index`` the dataset positions in order.
    """

    layers: tuple[str, ...]
    values: dict[str, torch.Tensor]
    outputs: torch.Tensor | None
    index: np.ndarray
    reduce: str = "none"
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, layer: str) -> torch.Tensor:
        if layer not in self.values:
            raise KeyError(f"no activations for {layer!r}; extracted: {list(self.layers)}")
        return self.values[layer]

    def __len__(self) -> int:
        return len(self.index)


# ----------------------------------------------------------------------------------------
# Data and layer names
# ----------------------------------------------------------------------------------------


def as_images(data: Any) -> torch.Tensor:
    """The images of ``data`` as one float tensor ``(N, C, *spatial)``.

    Accepts a tensor, a :class:`~trustmap.data.TensorData` (``.images``) or an
    :class:`~trustmap.data.ImageDataset` (loaded once with ``tensors()``). A NaN or Inf
    pixel, a wrong rank or an empty set raise a ValueError naming the problem.
    """
    images = data
    if hasattr(data, "tensors") and callable(data.tensors):
        images = data.tensors().images
    elif hasattr(data, "images") and isinstance(data.images, torch.Tensor):
        images = data.images
    if not isinstance(images, torch.Tensor):
        raise InputTypeError(
            "data must be an image tensor (N, C, *spatial), a TensorData or an ImageDataset; "
            f"got {type(data).__name__}"
        )
    if images.ndim not in (4, 5):
        raise InputError(
            f"images must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise InputError("the dataset has no images")
    if not images.is_floating_point():
        images = images.float()
    if not bool(torch.isfinite(images).all()):
        raise InputError("the images contain NaN or Inf values")
    return images


def _split_name(layer: str) -> tuple[str, bool]:
    if not isinstance(layer, str) or not layer:
        raise InputTypeError(f"a layer must be a non-empty module name (str), got {layer!r}")
    if layer.endswith(INPUT_SUFFIX):
        return layer[: -len(INPUT_SUFFIX)], True
    return layer, False


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The module of ``layer`` (``"name"`` or ``"name:input"``); an unknown name raises a
    ValueError that suggests the closest names."""
    name, _ = _split_name(layer)
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if not close:
        # A last-component match: "block4" for "features.block4".
        close = [n for n in names if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise InputError(
        f"the model has no layer named {name!r}{hint} (see `trustmap inspect --list-layers`)"
    )


def layer_table(model: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Every named module that runs on ``example[:1]``, in the order it finishes, with its
    output shape; one no-grad probe pass, nothing left on the model."""
    x = as_images(example)[:1]
    device = _model_device(model)
    found: dict[str, LayerInfo] = {}
    order: list[str] = []
    rank = x.ndim - 2

    def make_hook(name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_m: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            shape = tuple(output.shape[1:])
            spatial = output.ndim == rank + 2 and math.prod(output.shape[2:]) > 1
            calls = found[name].calls + 1 if name in found else 1
            found[name] = LayerInfo(
                name=name,
                kind=type(module).__name__,
                shape=shape,
                spatial=spatial,
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                calls=calls,
            )
            if name in order:
                order.remove(name)
            order.append(name)

        return hook

    with model_guard(model), torch.no_grad(), hook_handles() as handles:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name, module)))
        model(x.to(device=device, dtype=_model_dtype(model, x)))
    return [found[n] for n in order]


def batch_of_one(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """``image`` with a batch axis: ``(C, *s)`` and ``(1, C, *s)`` are told apart by the
    spatial rank of the model's first convolution ((C, D, H, W) is one volume for a 3D
    model, one batch of 2D images otherwise)."""
    rank = next(
        (m.weight.ndim - 2 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))),
        image.ndim - 1 if image.ndim == 4 else image.ndim - 2,
    )
    return image[None] if image.ndim == rank + 1 else image


def penultimate_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The feature vector before the classification layer: ``"<last Linear>:input"`` for
    the last ``nn.Linear`` that runs (``"fc:input"`` for small_cnn and ResNet,
    ``"class_layers.out:input"`` for MONAI's DenseNet); without a linear layer, the last
    module with a spatial output (its activations are then pooled by :func:`embed`)."""
    table = layer_table(model, example)
    modules = dict(model.named_modules())
    linear = [info.name for info in table if isinstance(modules[info.name], nn.Linear)]
    if linear:
        return linear[-1] + INPUT_SUFFIX
    spatial = [info.name for info in table if info.spatial]
    if spatial:
        return spatial[-1]
    raise InputError(
        "the model has neither a linear layer nor a spatial feature map to take features "
        "from; name a layer explicitly"
    )


def require_spatial(layer: str, activation: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """Raise one clear ValueError if ``activation`` is not a feature map ``(B, K, *s)`` with
    ``x``'s spatial rank (``what`` names the analysis that needs one)."""
    if activation.ndim != x.ndim:
        raise InputError(
            f"layer {layer!r} outputs shape {tuple(activation.shape[1:])} per image, without "
            f"{x.ndim - 2} spatial axes; {what} needs a layer with a spatial feature map "
            "(a convolution or its activation, e.g. 'features.block4')"
        )


# ----------------------------------------------------------------------------------------
# Passes
# ----------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _model_dtype(model: nn.Module, x: torch.Tensor) -> torch.dtype:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else x.dtype


def _reduce(value: torch.Tensor, reduce: Reduce, rank: int) -> torch.Tensor:
    if reduce is None or reduce == "none":
        return value
    if callable(reduce):
        return reduce(value)
    if reduce == "flatten":
        return value.flatten(1)
    if value.ndim != rank + 2:
        return value.flatten(1)
    dims = tuple(range(2, value.ndim))
    return value.mean(dims) if reduce == "mean" else value.amax(dims)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every requested layer has run."""


@contextlib.contextmanager
def _capture(
    model: nn.Module,
    layers: Sequence[str],
    store: dict[str, torch.Tensor],
    keep_grad: bool,
    stop: bool = False,
) -> Iterator[None]:
    """Hooks that write the last output (or input) of each layer into ``store``; with
    ``stop`` the forward pass ends (raising :class:`_Stop`) as soon as every layer has
    run once."""
    targets = [(layer, *_split_name(layer)) for layer in layers]
    modules = {layer: resolve_layer(model, layer) for layer in layers}

    def make_hook(layer: str, read_input: bool) -> Callable[..., Any]:
        def hook(_m: nn.Module, inputs: Any, output: Any = None) -> Any:
            value = inputs[0] if read_input else output
            if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
                value = value[0]
            if not isinstance(value, torch.Tensor):
                raise InputTypeError(
                    f"layer {layer!r} {'receives' if read_input else 'returns'} "
                    f"{type(value).__name__}, not a tensor; pick another layer"
                )
            if read_input:
                # The module may modify its input in place (ReLU(inplace=True)): keep a copy.
                store[layer] = value.clone() if keep_grad else value.detach().clone()
                if stop and len(store) == len(layers):
                    raise _Stop
                return None
            store[layer] = value if keep_grad else value.detach()
            if stop and len(store) == len(layers):
                # Nothing after this layer is needed: the clone below would be wasted too.
                store[layer] = store[layer].clone()
                raise _Stop
            if isinstance(output, torch.Tensor):
                # Hand a copy on, so that an in-place operation downstream cannot overwrite
                # the stored activation (and its gradient still flows).
                return output.clone()
            return None

        return hook

    with hook_handles() as handles:
        for layer, _name, read_input in targets:
            module = modules[layer]
            if read_input:
                handles.append(module.register_forward_pre_hook(make_hook(layer, True)))
            else:
                handles.append(module.register_forward_hook(make_hook(layer, False)))
        yield


def iter_activations(
    model: nn.Module,
    data: Any,
    layers: Sequence[str],
    *,
    batch_size: int = 64,
    indices: Sequence[int] | np.ndarray | None = None,
    grad: bool = False,
    outputs: bool = True,
    progress: Callable[[int, int], None] | None = None,
    _checked: torch.Tensor | None = None,
) -> Iterator[ActivationBatch]:
    """Yield the activations of ``layers`` batch by batch, in one pass over ``data``.

    Parameters
    ----------
    model
        Any ``nn.Module``; run in eval mode, its flags restored when the pass ends.
    data
        Images ``(N, C, *spatial)``, a TensorData or an ImageDataset.
    layers
        Module names, ``"name:input"`` for a module's input.
    batch_size
        Images per forward pass.
    indices
        Positions of ``data`` to run (all by default).
    grad
        Keep the graph: activations require grad (for gradient x activation); otherwise
        the pass runs under ``torch.no_grad``.
    outputs
        False ends each forward pass as soon as every requested layer has run once (the
        rest of the model is not computed; ``ActivationBatch.outputs`` is then None). A
        module that runs twice per pass is then read at its first call.
    progress
        Called as ``progress(done, total)`` after each batch.

    Hooks live for the whole pass (one registration, not one per batch) and are removed
    when the generator finishes, is closed early or raises.
    """
    if isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise InputError("no layer requested")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    images = _checked if _checked is not None else as_images(data)
    idx = np.arange(images.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    device = _model_device(model)
    dtype = _model_dtype(model, images)
    store: dict[str, torch.Tensor] = {}
    mode = torch.enable_grad() if grad else torch.no_grad()
    with model_guard(model), _capture(model, layers, store, keep_grad=grad, stop=not outputs):
        for done, start in enumerate(range(0, len(idx), batch_size), start=1):
            chunk = idx[start : start + batch_size]
            if indices is None:
                x = images[start : start + batch_size].to(device=device, dtype=dtype)
            else:
                x = images[torch.as_tensor(chunk)].to(device=device, dtype=dtype)
            store.clear()
            out = None
            with mode, contextlib.suppress(_Stop):
                out = model(x)
            missing = [layer for layer in layers if layer not in store]
            if missing:
                raise InputError(
                    f"layer(s) {missing} did not run during the forward pass; pick layers on "
                    "the path from the input to the output"
                )
            if outputs and not isinstance(out, torch.Tensor):
                raise InputTypeError(f"the model must return a tensor, got {type(out).__name__}")
            yield ActivationBatch(
                index=chunk, inputs=x, outputs=out, activations={k: store[k] for k in layers}
            )
            if progress is not None:
                progress(min(done * batch_size, len(idx)), len(idx))


def extract(
    model: nn.Module,
    data: Any,
    layers: str | Sequence[str],
    *,
    batch_size: int = 64,
    reduce: Reduce = "none",
    indices: Sequence[int] | np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    outputs: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Activations:
    """Activations of ``layers`` for every image of ``data``, in one batched pass.

    ``reduce`` shrinks each activation as it is collected (so a dataset's feature maps need
    not fit in memory): ``"none"`` keeps ``(N, K, *s)``, ``"mean"`` / ``"max"`` pool a
    feature map over its spatial axes to ``(N, K)`` (global average / max pooling), and
    ``"flatten"`` gives ``(N, K * prod(s))``; non-spatial activations are flattened; a
    callable maps each batch's ``(B, ...)`` activation to ``(B, ...)``. Values are stored
    on the CPU as ``dtype``. ``outputs=False`` skips the part of the model after the
    layers (see :func:`iter_activations`).
    """
    if isinstance(reduce, str) and reduce not in REDUCTIONS:
        raise InputError(f"reduce must be one of {REDUCTIONS} or a callable, got {reduce!r}")
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    outs: list[torch.Tensor] = []
    order: list[np.ndarray] = []
    images = as_images(data)
    rank = images.ndim - 2
    for batch in iter_activations(
        model, data, names, batch_size=batch_size, indices=indices, outputs=outputs,
        progress=progress, _checked=images,
    ):  # fmt: skip
        for name in names:
            parts[name].append(_reduce(batch.activations[name], reduce, rank).to("cpu", dtype))
        if batch.outputs is not None:
            outs.append(batch.outputs.detach().to("cpu", dtype))
        order.append(batch.index)
    return Activations(
        layers=tuple(names),
        values={n: torch.cat(v) for n, v in parts.items()},
        outputs=torch.cat(outs) if outs else None,
        index=np.concatenate(order),
        reduce=reduce if isinstance(reduce, str) else getattr(reduce, "__name__", "callable"),
    )
