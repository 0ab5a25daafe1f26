"""Open the model a user brings, in whatever form it was saved, and say what looks wrong.

:func:`open_model` accepts

* a TorchScript file (``torch.jit.save`` of a scripted or traced model),
* a ``torch.export`` program (``torch.export.save``, usually ``.pt2``),
* a trustmap checkpoint (``trustmap train`` writes ``model.pt``),
* a state dict with ``arch=`` one of trustmap's architectures (the spatial rank, input
  channels and classes are read from the weights' shapes),
* a MONAI bundle folder (``configs/inference.json`` or ``.yaml`` with a ``network_def``,
  and ``models/model.pt`` or ``models/model.ts``), and
* ``package.module:factory``, a function called without arguments that returns an
  ``nn.Module``, imported with the current directory on the import path (as
  ``python -m`` would), with ``weights=`` a state dict for it.

The file's kind is read from its content (a TorchScript archive holds ``code/``, an export
archive ``serialized_exported_program``), not from its suffix. Nothing is downloaded.

:func:`untrained_warning` and :func:`input_range_warning` catch the two silent mistakes of
a first run: explaining a randomly initialised model, and feeding it an image in units it
never saw in training (CT in raw Hounsfield units instead of windowed).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustmap.core.hooks import hook_handles
from trustmap.core.script import is_script_module, script_graph
from trustmap.errors import InputError, MissingFileError, ModelError, ModelTypeError

__all__ = ["LoadedModel", "input_range_warning", "open_model", "untrained_warning"]


@dataclass(frozen=True)
class LoadedModel:
    """The model in eval mode on the device, what it was loaded from, and warnings."""

    model: nn.Module
    kind: str  # torchscript, export, checkpoint, state-dict, monai-bundle, factory
    source: str
    warnings: tuple[str, ...] = field(default_factory=tuple)


def open_model(
    spec: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    *,
    arch: str | None = None,
) -> LoadedModel:
    """Load a model from ``spec`` (see the module docstring for the accepted forms).

    Raises :class:`~trustmap.errors.MissingFileError` for a missing file,
    :class:`~trustmap.errors.InputError` for options that do not apply and
    :class:`~trustmap.errors.ModelError` (:class:`~trustmap.errors.ModelTypeError` for a
    factory that returns something else than a module) naming the problem and what to
    pass instead.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        if weights is not None or arch is not None:
            raise InputError("--weights and --arch do not apply to a MONAI bundle folder")
        return _bundle(path, device)
    if path.is_file():
        return _file(path, weights, device, arch)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text):
        if arch is not None:
            raise InputError("--arch applies to a state dict file, not to a factory")
        return _factory(text, weights, device)
    if path.suffix or os.sep in text:
        raise MissingFileError(f"model file not found: {text}")
    raise InputError(
        f"model {text!r} is neither a file, a MONAI bundle folder nor "
        "'package.module:factory' (e.g. 'mypkg.models:build_classifier')"
    )


# -- files -------------------------------------------------------------------------------


def _archive_kind(path: Path) -> str:
    """``torchscript``, ``export``, ``pickle`` (torch.save) or ``unknown``."""
    if not zipfile.is_zipfile(path):
        return "unknown"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    if any("serialized_exported_program" in n or n.endswith("archive_format") for n in names):
        return "export"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "pickle"
    return "unknown"


def _file(path: Path, weights: Any, device: str, arch: str | None) -> LoadedModel:
    kind = _archive_kind(path)
    if kind in ("torchscript", "export") and (weights is not None or arch is not None):
        raise ModelError(
            f"{path} is a complete {'TorchScript' if kind == 'torchscript' else 'torch.export'} "
            "model: --weights and --arch apply to state dicts and factories only"
        )
    if kind == "torchscript":
        try:
            model = torch.jit.load(str(path), map_location=device)
        except RuntimeError as err:
            raise ModelError(f"cannot read TorchScript file {path}: {_first_line(err)}") from None
        return _finish(model.eval(), "torchscript", str(path), device)
    if kind == "export":
        return _finish(_export(path, device), "export", str(path), device)
    return _state_file(path, weights, device, arch)


def _export(path: Path, device: str) -> nn.Module:
    """A ``torch.export`` program, unflattened back into its module hierarchy (so CAM
    methods find layers by name and hooks run)."""
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # torch raises several types for a damaged archive
        raise ModelError(f"cannot read torch.export program {path}: {_first_line(err)}") from None
    module = torch.export.unflatten(program)
    return module.to(device)


def _state_file(path: Path, weights: Any, device: str, arch: str | None) -> LoadedModel:
    from trustmap.models.architectures import create, list_architectures
    from trustmap.models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint

    if weights is not None:
        raise ModelError(
            f"{path} holds weights itself; --weights applies to 'package.module:factory'"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt file
        raise ModelError(
            f"{path} is not a model file trustmap can read ({_first_line(err)}): save a "
            "TorchScript model (torch.jit.save), a torch.export program (torch.export.save), "
            "a trustmap checkpoint, or a state dict (torch.save(model.state_dict())) with "
            "--arch"
        ) from None
    if isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT:
        if arch is not None and arch != state.get("arch"):
            raise ModelError(
                f"{path} is a trustmap checkpoint of {state.get('arch')!r}, not {arch!r}"
            )
        model, _ = load_checkpoint(path, map_location=device)
        return _finish(model, "checkpoint", str(path), device)
    tensors = _state_dict(state)
    if tensors is None:
        raise ModelError(
            f"{path} holds a {type(state).__name__}, not a model: expected a TorchScript "
            "file, a torch.export program, a trustmap checkpoint or a state dict"
        )
    if arch is None:
        raise ModelError(
            f"{path} is a state dict (weights without the architecture): pass --arch "
            f"(one of {', '.join(list_architectures())}), or --model package.module:factory "
            f"--weights {path}"
        )
    dims, in_channels, num_classes, extra = _shapes_of(tensors, arch)
    model = create(
        arch, spatial_dims=dims, in_channels=in_channels, num_classes=num_classes, **extra
    )
    _load_state(
        model, tensors, f"{arch} ({dims}D, {in_channels} channel(s) in, {num_classes} out)", path
    )
    return _finish(model, "state-dict", str(path), device)


def _state_dict(state: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a state dict, also inside the usual wrappers (``state_dict``,
    ``model``, ``network``); None if ``state`` is not one."""
    if not isinstance(state, Mapping):
        return None
    for key in ("state_dict", "model", "network", "model_state_dict"):
        inner = state.get(key)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, torch.Tensor) for v in inner.values())
        ):
            state = inner
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    # DataParallel and Lightning prefixes
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _shapes_of(tensors: dict[str, torch.Tensor], arch: str) -> tuple[int, int, int, dict[str, Any]]:
    """Spatial rank, input channels and outputs read from the weights' shapes: the first
    convolution kernel ``(out, in, *k)`` gives the rank and channels, the last weight
    (linear ``(classes, features)`` or convolution) the outputs."""
    kernels = [t for k, t in tensors.items() if k.endswith("weight") and t.ndim in (4, 5)]
    weights = [t for k, t in tensors.items() if k.endswith("weight") and t.ndim >= 2]
    if not kernels or not weights:
        raise ModelError(
            f"the state dict has no convolution weights, so it cannot be a {arch}; "
            "pass --model package.module:factory --weights FILE for your own architecture"
        )
    first, last = kernels[0], weights[-1]
    extra: dict[str, Any] = {}
    if arch == "small_cnn":
        extra["width"] = int(first.shape[0])
    return first.ndim - 2, int(first.shape[1]), int(last.shape[0]), extra


def _load_state(model: nn.Module, state: Mapping[str, Any], what: str, source: Any) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as err:
        problems = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()][:3]
        detail = "; ".join(problems) or _first_line(err)
        raise ModelError(f"the weights in {source} do not fit {what}: {detail}") from None


# -- MONAI bundles ------------------------------------------------------------------------


def _bundle(folder: Path, device: str) -> LoadedModel:
    """A MONAI bundle: the ``network_def`` of its inference config, with the weights of
    ``models/model.pt``; or ``models/model.ts`` (TorchScript) when there is no
    ``model.pt``."""
    configs = [folder / "configs" / f"inference.{ext}" for ext in ("json", "yaml", "yml")]
    config = next((c for c in configs if c.is_file()), None)
    pt, ts = folder / "models" / "model.pt", folder / "models" / "model.ts"
    if config is None and not ts.is_file():
        raise ModelError(
            f"{folder} is a folder but not a MONAI bundle: expected configs/inference.json "
            "(or .yaml) and models/model.pt; a model file or package.module:factory also works"
        )
    if config is None or not pt.is_file():
        if ts.is_file():
            return _finish(
                torch.jit.load(str(ts), map_location=device).eval(),
                "monai-bundle",
                str(folder),
                device,
            )
        raise MissingFileError(f"the MONAI bundle {folder} has no models/model.pt")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        parser["bundle_root"] = str(folder)
        if "network_def" not in parser.config:
            raise KeyError("network_def")
        model = parser.get_parsed_content("network_def", instantiate=True)
    except KeyError as err:
        raise ModelError(
            f"{config} defines no {err.args[0]!r}; a bundle's network goes there"
        ) from None
    except Exception as err:  # MONAI wraps the user's config errors in several types
        raise ModelError(f"cannot build the network of {config}: {_first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"network_def of {config} is a {type(model).__name__}, not a module")
    try:
        state = torch.load(pt, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt file
        raise ModelError(f"cannot read weights {pt}: {_first_line(err)}") from None
    tensors = _state_dict(state)
    if tensors is None:
        raise ModelError(f"{pt} holds no state dict")
    _load_state(model, tensors, f"network_def of {config.name}", pt)
    return _finish(model, "monai-bundle", str(folder), device)


# -- factories ----------------------------------------------------------------------------


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on ``sys.path`` while importing, as ``python -m`` has it."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _factory(spec: str, weights: Any, device: str) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        with _cwd_importable():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ModelError(
            f"cannot import {module_name!r} for the model ({err}); it is looked up in the "
            f"current directory ({os.getcwd()}) and on PYTHONPATH: run trustmap from the "
            "folder that holds the package, or add that folder to PYTHONPATH"
        ) from None
    except ImportError as err:
        raise ModelError(f"cannot import {module_name!r} for the model: {err}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as err:  # the user's code: name it rather than print its traceback
        raise ModelError(
            f"the model factory {spec} raised {type(err).__name__}: {_first_line(err)}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        wpath = Path(weights)
        if not wpath.is_file():
            raise MissingFileError(f"weights file not found: {weights}")
        try:
            state = torch.load(wpath, map_location=device, weights_only=True)
        except Exception as err:  # torch raises several types for a corrupt file
            raise ModelError(f"cannot read weights {weights}: {_first_line(err)}") from None
        tensors = _state_dict(state)
        if tensors is None:
            raise ModelError(f"{weights} holds no state dict")
        _load_state(model, tensors, spec, weights)
    loaded = _finish(model, "factory", spec, device)
    if weights is None and loaded.warnings == () and _factory_is_random(factory, model):
        return LoadedModel(
            loaded.model, loaded.kind, loaded.source, (_RANDOM_FACTORY.format(spec),)
        )
    return loaded


_RANDOM_FACTORY = (
    "{} returns different weights on every call and no --weights were given: you are "
    "explaining a randomly initialised model, whose maps show the architecture, not "
    "anything learned. Pass --weights FILE"
)


def _factory_is_random(factory: Any, model: nn.Module) -> bool:
    """Whether a second call of the factory gives other weights (random initialisation)."""
    try:
        other = factory()
    except Exception:  # the first call worked; a second that fails tells nothing
        return False
    if not isinstance(other, nn.Module):
        return False
    lazy = nn.parameter.UninitializedParameter
    a = [p.detach().cpu() for p in model.parameters() if not isinstance(p, lazy)]
    b = [p.detach().cpu() for p in other.parameters() if not isinstance(p, lazy)]
    if len(a) != len(b):
        return False
    return any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b))


# -- warnings -----------------------------------------------------------------------------


def _finish(model: nn.Module, kind: str, source: str, device: str) -> LoadedModel:
    model = model.to(device).eval()
    reason = untrained_warning(model)
    notes = (f"{source}: {reason}",) if reason else ()
    return LoadedModel(model, kind, source, notes)


def _norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding BatchNorm running statistics (also inside TorchScript and
    torch.export models, where the class is not ``nn.BatchNorm*``)."""
    found = []
    for name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        mean, var = buffers.get("running_mean"), buffers.get("running_var")
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.numel():
            found.append((name, module))
    return found


def untrained_warning(model: nn.Module) -> str | None:
    """A warning when every BatchNorm layer still has its initial statistics (mean 0,
    variance 1): the model has never seen a batch of data, so its weights are random.
    None for a trained model or one without BatchNorm."""
    layers = _norm_layers(model)
    if not layers:
        return None
    for _, module in layers:
        mean, var = module.running_mean, module.running_var
        if bool((mean != 0).any()) or bool((var != 1).any()):
            return None
    return (
        f"all {len(layers)} BatchNorm layers hold their initial statistics (mean 0, "
        "variance 1): the model was never trained, so its maps show the architecture, not "
        "anything learned. Load trained weights (--weights, a checkpoint or a bundle)"
    )


# A channel whose batch mean is this many running standard deviations away from the
# running mean is far outside what the layer saw in training; a normalised input scores
# around 0-3, raw CT Hounsfield units into a model trained on [0, 1] in the hundreds.
_FAR = 10.0


def input_range_warning(model: nn.Module, x: torch.Tensor) -> str | None:
    """A warning when ``x`` is far outside the range the model was trained on.

    With trained BatchNorm statistics, the first BatchNorm layer's input on ``x`` is
    compared with its running mean and variance (the training distribution): the median
    over channels of ``|mean - running_mean| / sqrt(running_var)`` above 10 warns. Without
    them, values beyond +-100 warn (the range of raw CT or MR intensities, not of images
    a network is trained on).
    """
    lo, hi = float(x.min()), float(x.max())
    hint = (
        "window CT (--window lung, mediastinum, bone or brain) and/or normalise "
        "(--normalize minmax or zscore) as the model was trained"
    )
    layers = [(n, m) for n, m in _norm_layers(model) if bool((m.running_var != 1).any())]
    if layers:
        feature = _first_norm_input(model, x, [n for n, _ in layers])
        if feature is not None:
            name, inp = feature
            module = dict(model.named_modules())[name]
            dims = [0, *range(2, inp.ndim)]
            mean = inp.double().mean(dim=dims)
            rm, rv = module.running_mean.double(), module.running_var.double()
            if mean.shape == rm.shape:
                z = float(((mean - rm).abs() / (rv + 1e-5).sqrt()).median())
                if z > _FAR:
                    return (
                        f"the input (values {lo:.4g} to {hi:.4g}) is far outside what the "
                        f"model was trained on: its first BatchNorm layer {name!r} sees "
                        f"activations {z:.0f} standard deviations from its training mean, so "
                        f"probabilities and maps are meaningless; {hint}"
                    )
                return None
    if max(abs(lo), abs(hi)) > 100:
        return (
            f"the input values range from {lo:.4g} to {hi:.4g}, raw intensities (e.g. CT in "
            f"Hounsfield units) rather than an image a network is trained on; {hint}"
        )
    return None


def _first_norm_input(
    model: nn.Module, x: torch.Tensor, names: list[str]
) -> tuple[str, torch.Tensor] | None:
    """``(name, input)`` of the first of the BatchNorm layers ``names`` to run on ``x``."""
    with torch.no_grad():
        if is_script_module(model):
            graph = script_graph(model)
            reachable = [n for n in names if n in graph.calls and graph.calls[n].input is not None]
            if not reachable:
                return None
            first = min(reachable, key=lambda n: graph.calls[n].end)
            _, _, (inp,) = graph.run(model, x, inputs_of=[first])
            return first, inp
        seen: list[tuple[str, torch.Tensor]] = []
        modules = dict(model.named_modules())

        def make_hook(name: str) -> Any:
            def hook(_m: nn.Module, inputs: Any) -> None:
                if not seen and inputs and isinstance(inputs[0], torch.Tensor):
                    seen.append((name, inputs[0].detach()))

            return hook

        with hook_handles() as handles:
            for name in names:
                handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
            was = [(m, m.training) for m in model.modules()]
            try:
                model.eval()
                model(x)
            finally:
                for m, flag in was:
                    m.training = flag
        return seen[0] if seen else None


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(err).__name__
