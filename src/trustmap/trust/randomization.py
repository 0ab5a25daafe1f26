"""Sensitivity of saliency maps to the model's weights (Arun et al. 2021, criterion 2).

Model-parameter randomization test of Adebayo et al. 2018, "Sanity checks for saliency
maps" (NeurIPS), as used by Arun et al. 2021 (Figure 3): the weights of a
trained model are re-initialised one block at a time and the map of each randomized
model is compared with the trained model's map by SSIM.

* **Cascading** randomization goes top-down: the logits first, then the network's blocks
  from the last to the first, each stage keeping the earlier stages randomized. After the
  last stage the model is fully randomized.
* **Independent** randomization re-initialises one block at a time while every other
  block keeps its trained weights.

A map that stays similar to the trained map (SSIM above the randomization baseline, the
mean SSIM between maps of random pairs of different images, see
:func:`randomization_baseline`) does not depend on what the model learnt.

The caller's model is never modified: randomized models are copies.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trustmap.core.base import build
from trustmap.core.batching import chunks
from trustmap.core.hooks import hook_handles, model_guard
from trustmap.core.registry import get_method
from trustmap.core.seeding import resolve_seed
from trustmap.core.targets import Target, TargetSpec, resolve_target
from trustmap.core.validation import check_input, check_model_matches, check_output, positive_int

__all__ = [
    "RandomizationResult",
    "Stage",
    "cascading_randomization",
    "independent_randomization",
    "model_stages",
    "randomization_baseline",
    "randomized_models",
]

MODES = ("cascading", "independent")

# Fewer parameterised top-level units than this means the model wraps its body (e.g.
# ``features`` + ``classifier``), so discovery looks one level deeper.
_MIN_UNITS = 4

_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d and InstanceNorm*d
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

# A map method: a registered name, or ``(model, x, target) -> attributions (B, C, *spatial)``.
Method = str | Callable[[nn.Module, torch.Tensor, Any], Any]
Postprocess = Callable[[Any], Any]
Similarity = Callable[[np.ndarray, np.ndarray], Any]


# ----------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One randomization step: the modules whose parameters it re-initialises.

    Attributes
    ----------
    name:
        Stage name shown in reports ("logits", "layer4", ...).
    modules:
        Qualified names of modules of the model (as in ``model.named_modules()``); all
        parameters below them are re-initialised. ``""`` is the model itself.
    """

    name: str
    modules: tuple[str, ...]


StageSpec = Stage | str | Sequence[str] | tuple[str, Sequence[str]]


def model_stages(
    model: nn.Module,
    stages: Sequence[StageSpec] | None = None,
    *,
    example_input: torch.Tensor | None = None,
) -> list[Stage]:
    """The randomization stages of ``model``, top-down: index 0 is ``"logits"``.

    Automatic discovery (``stages=None``) splits the model into blocks:

    1. The parameterised children of the model are the candidate units. Module lists and
       dicts, which only hold modules, are always opened; a module with no parameters of
       its own whose only parameterised child is itself composite (``Wrapper(backbone)``)
       is replaced by that child.
    2. While there are fewer than four units, every unit that has children and no
       parameters of its own is opened (a model made of ``features`` and a classifier
       is split into the blocks of ``features``).
    3. Units are put in forward order. Without ``example_input`` this is the order in
       which the modules were registered, which is the order of execution for
       ``nn.Sequential`` and for almost every hand-written network; with
       ``example_input`` the order is that of an actual forward pass (recorded by
       temporary hooks), and units the forward pass never calls are left out, since
       randomizing them cannot change the output.
    4. The last unit is opened until it is a single layer: that layer is ``"logits"``.
    5. A normalisation layer directly after another unit belongs to that unit's stage
       (ResNet's ``bn1`` randomizes together with ``conv1``, stage ``"conv1"``).

    A model with parameters of its own (outside any submodule) is a single stage.
    Stages are named by the shortest unambiguous suffix of their first module's name.
    For trustmap's architectures this gives ``logits, block4 .. block1`` (``small_cnn``),
    ``logits, layer4 .. layer1, conv1`` (MONAI ``resnet18``) and ``logits, denseblock4,
    transition3, ..., denseblock1, conv0`` (MONAI ``densenet121``).

    Parameters
    ----------
    model:
        Any ``nn.Module`` with parameters.
    stages:
        Explicit stages, top-down. Each item is a :class:`Stage`, a module name, a list of
        module names, or a ``(name, [module names])`` pair. Unnamed stages are called
        ``"logits"`` (the first) or after their first module.
    example_input:
        A batch ``(B, C, *spatial)`` to run once to find the execution order (ignored
        with explicit ``stages``). Nothing is left on the model.

    Raises
    ------
    ValueError
        If the model has no parameters, a module name is unknown (the message suggests
        close names), a stage has no parameters, or two stages share modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError(f"{type(model).__name__} has no parameters to randomize")
    if stages is not None:
        return _explicit_stages(model, stages)
    order = _forward_order(model, example_input)
    units = _discover_units(model, order)
    return _group_units(units)


def _discover_units(model: nn.Module, order: dict[str, float]) -> list[tuple[str, nn.Module]]:
    if any(True for _ in model.parameters(recurse=False)) or not _param_children(model, ""):
        units = [("", model)]
    else:
        units = _param_children(model, "")
        while len(units) < _MIN_UNITS and any(_openable(m) for _, m in units):
            units = [u for name, m in units for u in _open(name, m)]
    units = _unique_modules(units)
    units = [u for u in units if order.get(u[0], np.inf) < np.inf]
    if not units:
        raise ValueError("the forward pass of example_input called no parameterised module")
    units.sort(key=lambda u: order[u[0]])
    # The logits are one layer, not the last block, even if the head is a small MLP.
    while _openable(units[-1][1]):
        name, module = units.pop()
        inner = [u for u in _open(name, module) if order.get(u[0], np.inf) < np.inf]
        units.extend(sorted(inner, key=lambda u: order[u[0]]))
    return units


def _group_units(units: list[tuple[str, nn.Module]]) -> list[Stage]:
    groups: list[list[str]] = []
    for i, (name, module) in enumerate(units):
        is_last = i == len(units) - 1
        if groups and not is_last and isinstance(module, _NORMS):
            groups[-1].append(name)
        else:
            groups.append([name])
    top_down = groups[::-1]
    names = _short_names([g[0] for g in top_down])
    stages = [Stage("logits", tuple(top_down[0]))]
    for group, short in zip(top_down[1:], names[1:]):
        stages.append(Stage(group[0] if short == "logits" else short, tuple(group)))
    return stages


def _param_children(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        if next(child.parameters(), None) is None:
            continue
        qualified = f"{prefix}.{name}" if prefix else name
        out.extend(_collapse(qualified, child))
    return out


def _collapse(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """A pure container is opened; a wrapper around a single composite child is that child
    (a wrapper around a single layer keeps its own, more telling, name)."""
    if not _openable(module):
        return [(name, module)]
    children = _param_children(module, name)
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return children
    if len(children) == 1 and _openable(children[0][1]):
        return children
    return [(name, module)]


def _openable(module: nn.Module) -> bool:
    # A module with parameters of its own cannot be split without losing them.
    has_own = any(True for _ in module.parameters(recurse=False))
    return not has_own and any(True for _ in module.children())


def _open(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    return _param_children(module, name) if _openable(module) else [(name, module)]


def _unique_modules(units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    # A module shared by two parents is randomized once, under its first name.
    seen: set[int] = set()
    out = []
    for name, module in units:
        if id(module) not in seen:
            seen.add(id(module))
            out.append((name, module))
    return out


def _forward_order(model: nn.Module, example_input: torch.Tensor | None) -> dict[str, float]:
    """Position of every module in forward order (``inf`` for modules never called)."""
    named = list(model.named_modules(remove_duplicate=False))
    if example_input is None:
        first: dict[int, float] = {}
        for i, (_, module) in enumerate(named):
            first.setdefault(id(module), float(i))
    else:
        x = check_input(example_input)
        check_model_matches(model, x)
        first = {}

        def record(module: nn.Module, _inputs: Any) -> None:
            first.setdefault(id(module), float(len(first)))

        with hook_handles() as handles, model_guard(model), torch.no_grad():
            for _, module in named:
                handles.append(module.register_forward_pre_hook(record))
            model(x)
    # A container such as ModuleList is never called itself: it runs when its first
    # descendant does.
    order: dict[str, float] = {}
    for name, module in named:
        order[name] = min(first.get(id(m), np.inf) for m in module.modules())
    return order


def _short_names(qualified: list[str]) -> list[str]:
    """Shortest dotted suffix of each name that no other name ends with; a bare number
    keeps its parent ("layer1.0", not "0")."""
    out = []
    for q in qualified:
        parts = q.split(".") if q else ["model"]
        chosen = q or "model"
        for k in range(1, len(parts) + 1):
            if parts[-k].isdigit() and k < len(parts):
                continue
            suffix = ".".join(parts[-k:])
            clash = [o for o in qualified if o != q and (o == suffix or o.endswith("." + suffix))]
            if not clash:
                chosen = suffix
                break
        out.append(chosen)
    return out


def _explicit_stages(model: nn.Module, stages: Sequence[StageSpec]) -> list[Stage]:
    if isinstance(stages, (str, Stage)) or not isinstance(stages, Sequence):
        raise TypeError(
            "stages must be a list of stages (module names, lists of module names, "
            f"(name, [module names]) pairs or Stage objects), got {type(stages).__name__}"
        )
    if len(stages) == 0:
        raise ValueError("stages is empty: give at least one stage to randomize")
    parsed: list[tuple[str | None, tuple[str, ...]]] = []
    for i, spec in enumerate(stages):
        parsed.append(_parse_stage(i, spec))
    unnamed_first = _short_names([mods[0] for _, mods in parsed])
    result: list[Stage] = []
    claimed: dict[str, str] = {}
    for i, ((name, mods), short) in enumerate(zip(parsed, unnamed_first)):
        if name is None:
            name = "logits" if i == 0 else short
        for mod_name in mods:
            module = _lookup(model, mod_name, where=f"stage {i} ({name!r})")
            if next(module.parameters(), None) is None:
                raise ValueError(
                    f"stage {i} ({name!r}): module {mod_name!r} has no parameters to randomize"
                )
            for other, owner in claimed.items():
                if _nested(mod_name, other):
                    raise ValueError(
                        f"stage {i} ({name!r}): module {mod_name!r} overlaps {other!r} of "
                        f"stage {owner!r}; each parameter must belong to one stage"
                    )
            claimed[mod_name] = name
        if any(s.name == name for s in result):
            raise ValueError(f"two stages are named {name!r}; stage names must be unique")
        result.append(Stage(name, mods))
    return result


def _parse_stage(i: int, spec: Any) -> tuple[str | None, tuple[str, ...]]:
    bad = TypeError(
        f"stage {i}: expected a module name, a list of module names, a (name, [module "
        f"names]) pair or a Stage, got {spec!r}"
    )
    if isinstance(spec, Stage):
        name, mods = spec.name, tuple(spec.modules)
    elif isinstance(spec, str):
        name, mods = None, (spec,)
    elif (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], (list, tuple))
    ):
        name, mods = spec[0], tuple(spec[1])
    elif isinstance(spec, (list, tuple)):
        name, mods = None, tuple(spec)
    else:
        raise bad
    if not mods or not all(isinstance(m, str) for m in mods):
        raise bad
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"stage {i}: the name must be a non-empty string, got {name!r}")
    return name, mods


def _nested(a: str, b: str) -> bool:
    return a == b or a == "" or b == "" or a.startswith(b + ".") or b.startswith(a + ".")


def _lookup(model: nn.Module, name: str, where: str = "") -> nn.Module:
    if name == "":
        return model
    modules = dict(model.named_modules(remove_duplicate=False))
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    prefix = f"{where}: " if where else ""
    raise ValueError(f"{prefix}the model has no module named {name!r}{hint}")


# ----------------------------------------------------------------------------------------
# Randomized copies
# ----------------------------------------------------------------------------------------


def randomize_(
    model: nn.Module, stage: Stage, *, generator: np.random.Generator | torch.Generator
) -> None:
    """Re-initialise, in place, the parameters of ``stage``'s modules of ``model``.

    Every module that defines ``reset_parameters()`` (convolutions, linear and
    normalisation layers) gets it called, as at construction: convolution and linear
    weights are redrawn from their default initialisers; normalisation layers return to
    weight 1, bias 0 and, for BatchNorm, running mean 0 and variance 1. Parameters of
    modules without ``reset_parameters`` are drawn from N(0, 0.01^2); their buffers are
    left alone. The draws use torch's generator seeded with a seed taken from
    ``generator``, inside :func:`torch.random.fork_rng`, so torch's global RNG state is
    the same afterwards. Private: it modifies ``model``; the public functions only call
    it on copies.
    """
    modules = [_lookup(model, name) for name in stage.modules]
    seed = _draw_seed(generator)
    cuda = sorted(
        {
            int(t.device.index or 0)
            for m in modules
            for t in (*m.parameters(), *m.buffers())
            if t.device.type == "cuda"
        }
    )
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        done: set[int] = set()
        for module in modules:
            for sub in module.modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()
                    done.update(id(p) for p in sub.parameters(recurse=False))
        for module in modules:
            for p in module.parameters():
                if id(p) not in done:
                    p.normal_(0.0, 0.01)
                    done.add(id(p))


def _draw_seed(generator: np.random.Generator | torch.Generator) -> int:
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(0, 2**63 - 1))
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator))
    raise TypeError(
        f"generator must be a numpy.random.Generator or torch.Generator, got "
        f"{type(generator).__name__}"
    )


def randomized_models(
    model: nn.Module,
    stages: Sequence[StageSpec] | None = None,
    *,
    mode: str = "cascading",
    seed: int | None = 0,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(stage_name, randomized_copy)`` for each stage, top-down.

    ``"cascading"``: the model is deep-copied once and the copy is randomized stage after
    stage, so the copy after stage ``k`` has stages ``0..k`` randomized. The SAME copy is
    yielded every time: use it (or copy it) before asking for the next stage.
    ``"independent"``: the copy is restored to the trained weights (``load_state_dict``)
    before each stage, so only stage ``k`` is randomized.

    Stage ``k`` draws its weights from the ``k``-th seed of ``numpy.random.default_rng(
    seed)`` in both modes, so its new weights are the same in both. Copies are in eval
    mode, on the model's device and dtype. ``model`` itself is never modified.

    Arguments are checked when the function is called, not at the first iteration.
    """
    mode = _check_mode(mode)
    resolved = model_stages(model, stages)
    seed = resolve_seed(seed)
    return _iterate_randomized(model, resolved, mode, seed)


def _iterate_randomized(
    model: nn.Module, stages: list[Stage], mode: str, seed: int
) -> Iterator[tuple[str, nn.Module]]:
    rng = np.random.default_rng(seed)
    work = _copy_model(model)
    for i, stage in enumerate(stages):
        if mode == "independent" and i > 0:
            work.load_state_dict(model.state_dict())
        randomize_(work, stage, generator=rng)
        yield stage.name, work


def _copy_model(model: nn.Module) -> nn.Module:
    try:
        work = copy.deepcopy(model)
    except Exception as exc:  # deepcopy failures come in many types
        raise TypeError(
            f"{type(model).__name__} cannot be deep-copied ({exc}); randomization works on "
            "a copy so that the trained model stays untouched"
        ) from exc
    return work.eval()


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


# ----------------------------------------------------------------------------------------
# Maps under randomization
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RandomizationResult:
    """Maps and SSIM of a randomization test.

    Attributes
    ----------
    stage_names:
        Stage names, top-down ("logits" first).
    mode:
        "cascading" or "independent".
    ssim:
        ``(S, B)``: SSIM of each stage's map with the trained map, per image.
    maps:
        ``(S + 1, B, *spatial)`` float32 post-processed maps; index 0 is the trained
        model, index ``k + 1`` is stage ``k``.
    seed:
        The seed the weights were drawn from.
    """

    stage_names: list[str]
    mode: str
    ssim: np.ndarray
    maps: np.ndarray
    seed: int

    def as_records(self, image_ids: Sequence[Any]) -> list[dict[str, Any]]:
        """One ``{"image", "stage", "value"}`` row per stage and image (SSIM values)."""
        ids = list(image_ids)
        if len(ids) != self.ssim.shape[1]:
            raise ValueError(
                f"got {len(ids)} image ids for {self.ssim.shape[1]} images; pass one id per image"
            )
        return [
            {"image": str(ids[b]), "stage": name, "value": float(self.ssim[k, b])}
            for k, name in enumerate(self.stage_names)
            for b in range(len(ids))
        ]


def cascading_randomization(
    model: nn.Module,
    method: Method,
    x: torch.Tensor,
    target: TargetSpec = None,
    *,
    stages: Sequence[StageSpec] | None = None,
    params: dict[str, Any] | None = None,
    seed: int | None = 0,
    mode: str = "cascading",
    postprocess: Postprocess | None = None,
    similarity: Similarity | None = None,
    reference_maps: Any = None,
    batch_size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> RandomizationResult:
    """Model-parameter randomization test (Adebayo et al. 2018; Arun et al. 2021, Figure 3).

    For each stage ``k`` (top-down, see :func:`model_stages`):
    ``SSIM_k(b) = SSIM(P(E(f_k, x_b, c_b)), P(E(f, x_b, c_b)))``, where ``f`` is the
    trained model, ``f_k`` its randomized copy, ``E`` the explainer, ``P`` the
    post-processing and ``c_b`` the target resolved once on ``f``: the randomized model
    explains the same class as the trained one, not its own (random) prediction.

    Parameters
    ----------
    model:
        The trained model; never modified.
    method:
        A registered method name (built with ``params``) or a callable
        ``(model, x, target) -> attributions (B, C, *spatial)``.
    x:
        ``(B, C, *spatial)`` images.
    target:
        Any target spec (:mod:`trustmap.core.targets`), resolved on the trained model.
    stages:
        Explicit stages (see :func:`model_stages`); by default discovered in the order of
        a forward pass of ``x[:1]``.
    params:
        Keyword parameters of a registered method, the same for every model. Give
        stochastic methods an explicit ``seed`` so that the trained and randomized maps
        share their noise.
    seed:
        Seed of the randomized weights (None draws one; it is recorded in the result).
    mode:
        "cascading" or "independent".
    postprocess:
        ``attributions -> (B, *spatial)`` maps in [0, 1]; defaults to
        :func:`trustmap.trust.postprocess.postprocess`.
    similarity:
        ``(maps_a (B, *spatial), maps_b) -> (B,)``; defaults to
        :func:`trustmap.metrics.similarity.ssim_batch`.
    reference_maps:
        The trained model's post-processed maps ``(B, *spatial)``, if already computed.
    batch_size:
        Images per explainer call (all at once if None).
    progress:
        Called with the stage name after each stage.

    Returns
    -------
    RandomizationResult
    """
    mode = _check_mode(mode)
    x = check_input(x)
    check_model_matches(model, x)
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")
    explain_fn = _explainer(method, params)
    post = _default_postprocess() if postprocess is None else postprocess
    sim = _default_similarity() if similarity is None else similarity
    resolved_stages = (
        model_stages(model, example_input=x[:1]) if stages is None else model_stages(model, stages)
    )
    seed = resolve_seed(seed)
    b, _c, *spatial = x.shape
    expected = (b, *spatial)

    with model_guard(model), torch.no_grad():
        output = check_output(model(x), b)
    fixed_target = _fixed_target(resolve_target(target, output))

    if reference_maps is None:
        attributions = _attribute(explain_fn, model, x, fixed_target, batch_size)
        reference = _as_maps(post(attributions), expected, "the trained model's maps")
    else:
        reference = _as_maps(reference_maps, expected, "reference_maps")
        if reference.min() < -1e-6 or reference.max() > 1 + 1e-6:
            raise ValueError(
                f"reference_maps must be post-processed maps in [0, 1]; got values in "
                f"[{reference.min():.3g}, {reference.max():.3g}]"
            )

    maps = np.empty((len(resolved_stages) + 1, *expected), dtype=np.float32)
    maps[0] = reference
    ssim = np.empty((len(resolved_stages), b), dtype=np.float64)
    randomized = _iterate_randomized(model, resolved_stages, mode, seed)
    for k, (name, work) in enumerate(randomized):
        attributions = _attribute(explain_fn, work, x, fixed_target, batch_size)
        stage_maps = _as_maps(post(attributions), expected, f"the maps of stage {name!r}")
        maps[k + 1] = stage_maps
        ssim[k] = _similarities(sim, stage_maps, reference, name)
        if progress is not None:
            progress(name)
    return RandomizationResult(
        stage_names=[s.name for s in resolved_stages],
        mode=mode,
        ssim=ssim,
        maps=maps,
        seed=seed,
    )


def independent_randomization(
    model: nn.Module, method: Method, x: torch.Tensor, target: TargetSpec = None, **kwargs: Any
) -> RandomizationResult:
    """:func:`cascading_randomization` with ``mode="independent"``: one block at a time,
    every other block trained."""
    if "mode" in kwargs:
        raise TypeError("independent_randomization sets mode='independent' itself")
    return cascading_randomization(model, method, x, target, mode="independent", **kwargs)


def _explainer(
    method: Method, params: dict[str, Any] | None
) -> Callable[[nn.Module, torch.Tensor, Any], Any]:
    if isinstance(method, str):
        cls = get_method(method)
        kwargs = dict(params or {})

        def run(model: nn.Module, x: torch.Tensor, target: Any) -> torch.Tensor:
            return build(cls, model, kwargs).explain(x, target=target).attributions

        return run
    if callable(method):
        if params:
            raise TypeError(
                "params only apply to a registered method name; bind them into the callable"
            )
        return method
    raise TypeError(
        "method must be a registered method name or a callable (model, x, target) -> "
        f"attributions, got {type(method).__name__}"
    )


def _fixed_target(resolved: Target) -> Any:
    """A target spec that selects, on any model, what ``resolved`` selected on the
    trained one: classes as a LongTensor rather than "the predicted class"."""
    if resolved.kind in ("class", "binary"):
        return resolved.classes
    if resolved.kind == "region":
        return (resolved.classes, resolved.region)
    return resolved.fn


def _target_rows(spec: Any, sl: slice) -> Any:
    if isinstance(spec, torch.Tensor):
        return spec[sl]
    if isinstance(spec, tuple):
        return (spec[0][sl], spec[1][sl])
    return spec


def _attribute(
    explain_fn: Callable[[nn.Module, torch.Tensor, Any], Any],
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    batch_size: int | None,
) -> Any:
    # Eval mode for callables too: in training mode BatchNorm would update the caller's
    # running statistics, and the maps would depend on the other images of the batch.
    with model_guard(model):
        parts = [
            explain_fn(model, x[sl], _target_rows(target, sl))
            for sl in chunks(x.shape[0], batch_size)
        ]
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat([p.detach() for p in parts])
    return np.concatenate([_numpy(p) for p in parts])


def _numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _as_maps(maps: Any, expected: tuple[int, ...], what: str) -> np.ndarray:
    arr = _numpy(maps).astype(np.float64, copy=False)
    if arr.shape != expected:
        raise ValueError(f"{what} have shape {arr.shape}; expected {expected}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain NaN or Inf")
    return arr


def _similarities(sim: Similarity, a: np.ndarray, b: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(sim(a, b), dtype=np.float64).reshape(-1)
    if values.shape != (a.shape[0],):
        raise ValueError(
            f"similarity returned {values.shape[0]} values for {a.shape[0]} maps at stage {name!r}"
        )
    return values


def _default_postprocess() -> Postprocess:
    from trustmap.trust.postprocess import postprocess

    return postprocess


def _default_similarity() -> Similarity:
    from trustmap.metrics.similarity import ssim_batch

    return ssim_batch


# ----------------------------------------------------------------------------------------
# Baseline
# ----------------------------------------------------------------------------------------


def randomization_baseline(
    maps: Any,
    *,
    n_pairs: int = 50,
    seed: int = 0,
    similarity: Similarity | None = None,
    return_pairs: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """SSIM between the trained model's maps of random pairs of different images.

    Arun et al.'s (2021) randomization baseline is the mean of these values over 50 pairs: how
    similar the maps of two unrelated images are. Pairs ``(i, j)``, ``i != j``, are drawn
    without repeating an unordered pair. If the ``N`` maps give fewer than ``n_pairs``
    pairs (``N (N - 1) / 2``), all of them are used, so the length of the result is the
    number of pairs actually compared.

    Parameters
    ----------
    maps:
        ``(N, *spatial)`` post-processed maps, ``N >= 2``.
    n_pairs:
        Number of pairs (Arun et al. 2021: 50).
    seed:
        Seed of the pair draw.
    similarity:
        ``(a (K, *spatial), b) -> (K,)``; defaults to
        :func:`trustmap.metrics.similarity.ssim_batch`.
    return_pairs:
        Also return the ``(K, 2)`` indices of the pairs.

    Returns
    -------
    numpy.ndarray
        ``(min(n_pairs, N (N - 1) / 2),)`` SSIM values (and the pairs if asked).
    """
    arr = _numpy(maps).astype(np.float64, copy=False)
    if arr.ndim not in (3, 4):
        raise ValueError(f"maps must have shape (N, H, W) or (N, D, H, W), got {arr.shape}")
    n = arr.shape[0]
    if n < 2:
        raise ValueError(f"the randomization baseline needs at least 2 maps, got {n}")
    if not np.isfinite(arr).all():
        raise ValueError("maps contain NaN or Inf")
    positive_int("n_pairs", n_pairs)
    seed = resolve_seed(seed)
    sim = _default_similarity() if similarity is None else similarity
    pairs = _draw_pairs(n, n_pairs, np.random.default_rng(seed))
    values = np.asarray(sim(arr[pairs[:, 0]], arr[pairs[:, 1]]), dtype=np.float64).reshape(-1)
    if values.shape != (len(pairs),):
        raise ValueError(f"similarity returned {values.shape[0]} values for {len(pairs)} pairs")
    return (values, pairs) if return_pairs else values


def _draw_pairs(n: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    total = n * (n - 1) // 2
    if total <= 1_000_000:
        i, j = np.triu_indices(n, k=1)
        pick = rng.permutation(total)[: min(n_pairs, total)]
        return np.stack([i[pick], j[pick]], axis=1)
    # Too many pairs to list: draw with rejection; collisions are rare at this size.
    chosen: dict[tuple[int, int], None] = {}
    while len(chosen) < n_pairs:
        a, b = (int(v) for v in rng.choice(n, size=2, replace=False))
        chosen.setdefault((min(a, b), max(a, b)), None)
    return np.array(list(chosen), dtype=np.int64)
