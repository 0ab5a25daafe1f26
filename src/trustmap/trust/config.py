"""What ``trustmap trust`` runs: the dataset, models, methods and settings of the protocol
of Arun et al. (2021).

A :class:`TrustConfig` comes from a preset (``quick``, ``default``, ``full``), from a TOML or
YAML file, or from a mapping. Everything is checked before any work starts: unknown keys,
unknown methods and architectures, missing checkpoint files and out-of-range numbers raise a
``ValueError`` that names the key.

>>> cfg = TrustConfig.from_preset("quick", out="trust_quick")
>>> cfg = load_config("trust.toml")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trustmap.errors import ConfigError, MissingFileError, TrustmapError

# Arun et al. 2021, Table 1: the eight saliency methods it evaluated.
PAPER_METHODS = (
    "gradient",
    "smoothgrad",
    "integrated_gradients",
    "smooth_ig",
    "grad_cam",
    "xrai",
    "guided_backprop",
    "guided_grad_cam",
)

PRESETS = ("quick", "default", "full")

# The settings a config's randomization and faithfulness tables start from.
RANDOMIZATION_DEFAULTS: dict[str, Any] = {
    "independent": True,
    "n_pairs": 50,
    "seed": 0,
    "stages": None,
}
FAITHFULNESS_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "n_images": 16,
    "steps": 20,
    "n_values": [16, 64, 256, 1024],
    "n_subsets": 32,
}


def _config_errors(func: Any) -> Any:
    """``func`` raising the documented types: a ConfigError for a bad value (a ValueError
    or TypeError of the checks), a MissingFileError for a missing file."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TrustmapError:
            raise
        except FileNotFoundError as err:
            raise MissingFileError(str(err)) from None
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from None

    return wrapper


@dataclass
class ModelSpec:
    """One model role: an architecture trained with ``seeds`` (one model per seed), or
    ``checkpoints`` written by ``trustmap train`` / :func:`trustmap.models.save_checkpoint`.

    Role A needs two models (the replicates of criterion 3), role B one, and the localizer
    two (the high baseline of criteria 3 and 4; the first also serves criterion 1).
    """

    arch: str
    seeds: list[int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)


@dataclass
class TrustConfig:
    """Every setting of a trust run. See ``docs``/README "The trust protocol" for a file example.

    Attributes
    ----------
    dataset
        A phantom name (generated on first use) or a dataset directory / real-dataset path
        that :func:`trustmap.data.open_dataset` reads.
    out
        Output directory (results, figures, report, models and the resumable cache).
    phantom
        Generator options when ``dataset`` is a phantom name (``n``, ``size``, ``seed``,
        ``shortcut``, ``difficulty``).
    size
        Image size the models are trained on and the maps are computed at (None: native).
    n_images
        Positive test images evaluated (those with a non-empty mask; None: all).
    models
        ``{"A": ModelSpec, "B": ModelSpec, "localizer": ModelSpec}``.
    training
        :class:`~trustmap.models.TrainConfig` fields for the classifiers.
    localizer_training
        Fields that replace ``training``'s for the localizers (``lr`` None: the localizer
        default).
    methods, method_params
        Registered method names, and keyword parameters per method.
    postprocess
        :class:`~trustmap.trust.postprocess.PostprocessConfig` fields.
    randomization
        ``independent`` (bool), ``n_pairs`` (randomization baseline pairs), ``seed``,
        ``stages`` (None: discovered; else a list of module-name lists, top-down).
    faithfulness
        ``enabled``, ``n_images``, ``steps`` (deletion/insertion), ``n_values`` and
        ``n_subsets`` (sensitivity-n).
    alpha
        Significance level of every test (two-sided).
    batch_size
        Images per explainer call.
    device
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    seed
        Seed of image selection and of every seeded method.
    preset
        The preset this config started from (recorded in the report).
    """

    dataset: str = "cxr-pneumothorax"
    out: str = "trust_out"
    phantom: dict[str, Any] = field(default_factory=dict)
    size: int | None = 64
    n_images: int | None = 50
    models: dict[str, ModelSpec] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    localizer_training: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: list(PAPER_METHODS))
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)
    randomization: dict[str, Any] = field(default_factory=dict)
    faithfulness: dict[str, Any] = field(default_factory=dict)
    alpha: float = 0.05
    batch_size: int = 16
    device: str = "cpu"
    seed: int = 0
    preset: str = "default"

    # -- construction -------------------------------------------------------------------

    @classmethod
    @_config_errors
    def from_preset(cls, name: str = "default", **overrides: Any) -> TrustConfig:
        """A preset, with top-level fields replaced by ``overrides``.

        ``default`` fits 15 minutes on 2 CPU cores from scratch (data, five models, eight
        methods on 50 images); ``quick`` fits 3 minutes (smaller data, 12 images, fewer
        samples); ``full`` follows Arun et al. 2021 more closely (DenseNet121 and ResNet-18 at
        128 x 128, every positive test image, the methods' paper settings) and is meant for
        a GPU (``device="cuda"``).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        data = _preset_dict(name)
        data.update(overrides)
        return cls.from_mapping(data, base=name)

    @classmethod
    @_config_errors
    def from_mapping(cls, data: Mapping[str, Any], *, base: str | None = None) -> TrustConfig:
        """Build from a mapping (a parsed config file). Keys missing from ``data`` take the
        preset ``base`` (``data["preset"]``, else ``"default"``); nested tables are merged
        key by key into the preset's."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a trust config must be a mapping, got {type(data).__name__}")
        name = base or data.get("preset", "default")
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; choose one of {PRESETS}")
        merged = _preset_dict(name)
        _check_keys("config", data, [f.name for f in dataclasses.fields(cls)])
        for key, value in data.items():
            if key == "models":
                _merge_models(merged["models"], value)
            elif isinstance(merged.get(key), dict) and key != "models":
                if not isinstance(value, Mapping):
                    raise ValueError(f"{key} must be a table/mapping, got {value!r}")
                merged[key] = {**merged[key], **copy.deepcopy(dict(value))}
            else:
                merged[key] = copy.deepcopy(value)
        merged["preset"] = name
        models = {
            role: ModelSpec(**spec) if not isinstance(spec, ModelSpec) else spec
            for role, spec in merged.pop("models").items()
        }
        cfg = cls(models=models, **merged)
        cfg.validate()
        return cfg

    # -- checks ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise a :class:`~trustmap.errors.ConfigError` (a ValueError) naming the key of
        the first problem, or a :class:`~trustmap.errors.MissingFileError` for a missing
        dataset or checkpoint, before any work.

        Beyond the keys, types and ranges, every method is run once with its parameters
        on a small stand-in model (sample and step counts capped), the architectures are
        built with their ``kwargs`` without allocating weights, and the randomization
        stages and ``layer`` parameters are looked up in them.
        """
        _config_errors(self._validate)()
        _config_errors(check_values)(self)

    def _validate(self) -> None:
        from trustmap.core.registry import list_methods
        from trustmap.models import list_architectures

        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a phantom name or a path, got {self.dataset!r}")
        _expanded(self.out, "out")
        _check_dataset(self.dataset)
        _check_keys("phantom", self.phantom, ["n", "size", "seed", "shortcut", "difficulty"])
        if self.size is not None:
            _positive_int("size", self.size, minimum=8)
        if self.n_images is not None:
            _positive_int("n_images", self.n_images, minimum=2)
        _positive_int("batch_size", self.batch_size)
        _int("seed", self.seed)
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha!r}")
        if not isinstance(self.device, str) or not (
            self.device == "cpu" or self.device.startswith("cuda")
        ):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

        known = list_methods()
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError("methods must be a non-empty list of registered method names")
        for name in self.methods:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"methods: unknown method {name!r}{hint} (see `trustmap methods`)")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: a method is listed twice in {self.methods}")
        for name, params in self.method_params.items():
            # The presets set parameters for methods a config may leave out; only a name
            # that is no method at all is an error.
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"method_params: unknown method {name!r}{hint}")
            if not isinstance(params, Mapping):
                raise ValueError(f"method_params.{name} must be a table of parameters")
            _check_method_params(name, params)

        needs = {"A": 2, "B": 1, "localizer": 2}
        _check_keys("models", self.models, list(needs))
        archs = list_architectures()
        for role, count in needs.items():
            spec = self.models.get(role)
            if spec is None:
                raise ValueError(f"models.{role} is missing")
            if spec.arch not in archs:
                close = difflib.get_close_matches(str(spec.arch), archs, n=1, cutoff=0.4)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"models.{role}.arch: unknown architecture {spec.arch!r}{hint}")
            localizer = spec.arch in ("unet", "box_localizer")
            if (role == "localizer") != localizer:
                kind = (
                    "a localizer (unet, box_localizer)" if role == "localizer" else "a classifier"
                )
                raise ValueError(f"models.{role}.arch must be {kind}, got {spec.arch!r}")
            if spec.checkpoints:
                if len(spec.checkpoints) != count:
                    raise ValueError(
                        f"models.{role}.checkpoints: {count} needed, got {len(spec.checkpoints)}"
                    )
                for path in spec.checkpoints:
                    if not _expanded(path, f"models.{role}.checkpoints").is_file():
                        raise FileNotFoundError(f"models.{role}.checkpoints: no file {path}")
            elif len(spec.seeds) != count:
                raise ValueError(f"models.{role}.seeds: {count} needed, got {spec.seeds!r}")
            for s in spec.seeds:
                _int(f"models.{role}.seeds", s)

        from trustmap.models import TrainConfig

        train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
        _check_keys("training", self.training, train_fields)
        _check_keys("localizer_training", self.localizer_training, train_fields)
        self.train_config().validate()
        self.train_config(**self.localizer_training).validate()
        from trustmap.trust.postprocess import PostprocessConfig

        _check_keys(
            "postprocess", self.postprocess, [f.name for f in dataclasses.fields(PostprocessConfig)]
        )
        PostprocessConfig(**self.postprocess)
        _check_keys(
            "randomization", self.randomization, ["independent", "n_pairs", "seed", "stages"]
        )
        _positive_int("randomization.n_pairs", self.randomization_settings()["n_pairs"])
        _check_keys(
            "faithfulness",
            self.faithfulness,
            ["enabled", "n_images", "steps", "n_values", "n_subsets"],
        )
        faith = self.faithfulness_settings()
        if faith["enabled"]:
            _positive_int("faithfulness.n_images", faith["n_images"])
            _positive_int("faithfulness.steps", faith["steps"], minimum=2)
            _positive_int("faithfulness.n_subsets", faith["n_subsets"], minimum=3)
            for n in faith["n_values"]:
                _positive_int("faithfulness.n_values", n)

    # -- views ----------------------------------------------------------------------------

    def randomization_settings(self) -> dict[str, Any]:
        """``randomization`` over :data:`RANDOMIZATION_DEFAULTS`."""
        return {**copy.deepcopy(RANDOMIZATION_DEFAULTS), **self.randomization}

    def faithfulness_settings(self) -> dict[str, Any]:
        """``faithfulness`` over :data:`FAITHFULNESS_DEFAULTS`."""
        return {**copy.deepcopy(FAITHFULNESS_DEFAULTS), **self.faithfulness}

    def train_config(self, **extra: Any) -> Any:
        """The :class:`~trustmap.models.TrainConfig` of the classifiers."""
        from trustmap.models import AugmentConfig, TrainConfig

        values = dict(self.training)
        if isinstance(values.get("augment"), Mapping):
            values["augment"] = AugmentConfig(**values["augment"])
        values.setdefault("size", self.size)
        values.setdefault("device", self.device)
        values.update(extra)
        try:
            return TrainConfig(**values)
        except TypeError as err:
            raise ValueError(f"training: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view; :meth:`from_mapping` of it gives the same config back."""
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out, default=str))


def load_config(path: str | Path, **overrides: Any) -> TrustConfig:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config file.

    ``overrides`` replace top-level keys after reading (the command line uses this for
    ``--out`` and ``--device``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    kind = "TOML" if suffix == ".toml" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {kind}: {err}") from None
    except Exception as err:
        if type(err).__module__.startswith("yaml"):
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrustConfig.from_mapping(data)
    except TrustmapError as err:
        # The same error type, naming the file the problem is in.
        raise type(err)(f"{path}: {err}") from None


# -- presets ------------------------------------------------------------------------------


def _preset_dict(name: str) -> dict[str, Any]:
    # The CPU defaults keep Arun et al.'s (2021) protocol (eight methods, cascading and independent
    # randomization, 50 random pairs, SSIM with 7x7 windows) and shrink only the costs:
    # 64 x 64 maps, small models and fewer noise samples for SmoothGrad and Smooth IG.
    # Measured on cxr-pneumothorax at 64 x 64: small_cnn (width 16) with a one-cycle schedule
    # reaches test AUCs of 0.949, 0.945 and 0.935 with seeds 0, 1 and 2 in 15 epochs. With a
    # constant rate and early stopping on the validation loss, seed 1 stopped at chance
    # (0.58-0.60): its BatchNorm statistics make the validation loss jump between epochs.
    training = {
        "epochs": 15,
        "patience": None,
        "scheduler": "onecycle",
        "lr": 2e-3,
        "batch_size": 64,
        "n_boot": 500,
    }
    # The U-Net: its own learning rate, early stopping; seed 1 needed 20 epochs (detection
    # AUC 0.90) where seed 0 had 0.96 after 12.
    localizer_training = {
        "epochs": 20,
        "patience": 6,
        "min_epochs": 5,
        "scheduler": "none",
        "lr": None,
        "batch_size": 32,
    }
    params: dict[str, dict[str, Any]] = {
        "smoothgrad": {"n_samples": 25, "noise_level": 0.15, "seed": 0},
        "integrated_gradients": {"n_steps": 25},
        "smooth_ig": {"n_samples": 10, "n_steps": 25, "noise_level": 0.15, "seed": 0},
        "xrai": {"n_steps": 25},
    }
    base: dict[str, Any] = {
        "dataset": "cxr-pneumothorax",
        "out": "trust_out",
        "phantom": {},
        "size": 64,
        "n_images": 50,
        "models": {
            "A": {"arch": "small_cnn", "seeds": [0, 1], "kwargs": {"width": 16}},
            "B": {
                "arch": "resnet18",
                "seeds": [0],
                "kwargs": {"widen_factor": 0.25, "conv1_t_stride": 2},
            },
            # ReLU instead of MONAI's PReLU: the same Dice on the phantoms, and 4 to 10
            # times faster to train on a CPU.
            "localizer": {
                "arch": "unet",
                "seeds": [0, 1],
                "kwargs": {"act": "RELU", "num_res_units": 1},
            },
        },
        "training": training,
        "localizer_training": localizer_training,
        "methods": list(PAPER_METHODS),
        "method_params": params,
        "postprocess": {},
        "randomization": copy.deepcopy(RANDOMIZATION_DEFAULTS),
        "faithfulness": copy.deepcopy(FAITHFULNESS_DEFAULTS),
        "alpha": 0.05,
        "batch_size": 16,
        "device": "cpu",
        "seed": 0,
    }
    if name == "quick":
        # The same data and architectures as the default with fewer epochs (a smaller
        # small_cnn stayed near chance, and maps of a model that has learned nothing test
        # nothing); fewer images and noise samples.
        base["n_images"] = 12
        base["training"] = {**training, "epochs": 8, "n_boot": 200}
        # Batches of 16 give the U-Net twice the steps in the same time: seed 1 reached a
        # detection AUC of 0.89 in 8 epochs (0.46 with batches of 32).
        base["localizer_training"] = {
            **localizer_training,
            "epochs": 8,
            "patience": None,
            "batch_size": 16,
        }
        base["method_params"] = {
            "smoothgrad": {"n_samples": 10, "noise_level": 0.15, "seed": 0},
            "integrated_gradients": {"n_steps": 16},
            "smooth_ig": {"n_samples": 4, "n_steps": 16, "noise_level": 0.15, "seed": 0},
            "xrai": {"n_steps": 16},
        }
        base["faithfulness"] = {**base["faithfulness"], "n_images": 4, "n_subsets": 16}
    elif name == "full":
        base["size"] = 128
        base["n_images"] = None
        base["models"]["A"] = {"arch": "densenet121", "seeds": [0, 1], "kwargs": {}}
        base["models"]["B"] = {"arch": "resnet18", "seeds": [0], "kwargs": {}}
        base["training"] = {
            **training,
            "epochs": 30,
            "lr": 1e-3,
            "batch_size": 32,
            "n_boot": 1000,
        }
        base["method_params"] = {
            "smoothgrad": {"n_samples": 50, "noise_level": 0.15, "seed": 0},
            "integrated_gradients": {"n_steps": 25},
            "smooth_ig": {"n_samples": 25, "n_steps": 25, "noise_level": 0.15, "seed": 0},
            "xrai": {"n_steps": 25},
        }
        base["faithfulness"] = {**base["faithfulness"], "n_images": 50}
    return base


# -- helpers ------------------------------------------------------------------------------


def _merge_models(target: dict[str, dict[str, Any]], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ValueError("models must be a table with entries A, B and localizer")
    _check_keys("models", value, ["A", "B", "localizer"])
    for role, spec in value.items():
        if isinstance(spec, ModelSpec):
            target[role] = dataclasses.asdict(spec)
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"models.{role} must be a table (arch, seeds, kwargs, checkpoints)")
        _check_keys(f"models.{role}", spec, ["arch", "seeds", "seed", "kwargs", "checkpoints"])
        merged = dict(target[role])
        if "arch" in spec and spec["arch"] != merged["arch"]:
            merged["kwargs"] = {}  # the preset's kwargs belong to the preset's architecture
        spec = dict(spec)
        if "seed" in spec:
            spec["seeds"] = [spec.pop("seed")]
        if "checkpoints" in spec and isinstance(spec["checkpoints"], str):
            spec["checkpoints"] = [spec["checkpoints"]]
        merged.update(copy.deepcopy(spec))
        target[role] = merged


def _check_keys(where: str, data: Mapping[str, Any], allowed: list[str]) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint} (allowed: {', '.join(allowed)})")


def _expanded(path: Any, key: str) -> Path:
    """``path`` with ``~`` expanded; a ``~user`` that does not exist names the key."""
    if not isinstance(path, str | Path) or not str(path):
        raise ConfigError(f"{key} must be a path, got {path!r}")
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        raise ConfigError(f"{key}: {path!r} names a home directory that does not exist") from None


def _check_dataset(dataset: str) -> None:
    from trustmap.data.phantoms import PHANTOMS

    if dataset in PHANTOMS:
        return
    path = _expanded(dataset, "dataset")
    if not path.exists():
        close = difflib.get_close_matches(dataset, list(PHANTOMS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise FileNotFoundError(
            f"dataset {dataset!r} is neither an existing path nor a phantom name "
            f"({', '.join(PHANTOMS)}){hint}"
        )


def _check_method_params(name: str, params: Mapping[str, Any]) -> None:
    import inspect

    from trustmap.core.registry import get_method

    sig = inspect.signature(get_method(name).__init__)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    known = [n for n in sig.parameters if n not in ("self", "model")]
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"method_params.{name}: {name} has no parameter {key!r}{hint}")


def _int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
    _int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


# -- values that only running them checks (issue 19) ------------------------------------------

#: Method parameters that only set how much work a method does; the check run caps them.
_COST_PARAMS = ("n_samples", "n_steps", "n_iter", "max_iter", "background")
_CHECK_CAP = 4


def check_values(cfg: TrustConfig) -> None:
    """Checks beyond keys and types, each naming its key (see :meth:`TrustConfig.validate`):
    seeds, booleans, model kwargs, randomization stages, ``layer`` names and every
    method's parameter values."""
    _seed("seed", cfg.seed)
    if "seed" in cfg.phantom:
        _seed("phantom.seed", cfg.phantom["seed"])
    randomization = cfg.randomization_settings()
    _seed("randomization.seed", randomization["seed"])
    _bool("randomization.independent", randomization["independent"])
    _bool("faithfulness.enabled", cfg.faithfulness_settings()["enabled"])
    for table in ("training", "localizer_training", "postprocess"):
        for key, value in getattr(cfg, table).items():
            if isinstance(_field_default(table, key), bool):
                _bool(f"{table}.{key}", value)
    for role, spec in cfg.models.items():
        for s in spec.seeds:
            _seed(f"models.{role}.seeds", s)
    dims, channels = _dataset_geometry(cfg.dataset)
    classifiers = {}
    for role in ("A", "B", "localizer"):
        spec = cfg.models[role]
        if spec.checkpoints:
            continue
        model = _skeleton(role, spec.arch, dims, channels, json.dumps(spec.kwargs, sort_keys=True))
        if role != "localizer":
            classifiers[role] = model
    stages = randomization["stages"]
    if stages is not None:
        from trustmap.trust.randomization import model_stages

        for role, model in classifiers.items():
            try:
                model_stages(model, stages)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"randomization.stages (models.{role}): {err}") from None
    for method in cfg.methods:
        params = dict(cfg.method_params.get(method, {}))
        layer = params.pop("layer", None)
        if layer is not None:
            for role, model in classifiers.items():
                names = dict(model.named_modules())
                if not isinstance(layer, str) or layer not in names:
                    close = difflib.get_close_matches(str(layer), list(names), n=1, cutoff=0.6)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ConfigError(
                        f"method_params.{method}.layer: models.{role} ({cfg.models[role].arch}) "
                        f"has no layer {layer!r}{hint}"
                    )
        _check_bool_params(method, params)
        _dry_run(method, json.dumps(params, sort_keys=True, default=repr), dims, channels, cfg.size)


def _seed(name: str, value: Any) -> None:
    _int(name, value)
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be a non-negative integer below 2**63, got {value}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"{name} must be true or false, got {value!r}"
            + ("; a string such as 'no' would count as true" if isinstance(value, str) else "")
        )


def _field_default(table: str, key: str) -> Any:
    from trustmap.models import TrainConfig
    from trustmap.trust.postprocess import PostprocessConfig

    cls = PostprocessConfig if table == "postprocess" else TrainConfig
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f.default
    return None


def _check_bool_params(method: str, params: Mapping[str, Any]) -> None:
    import inspect

    from trustmap.core.registry import get_method

    sig = inspect.signature(get_method(method).__init__)
    for key, value in params.items():
        p = sig.parameters.get(key)
        if p is not None and isinstance(p.default, bool):
            _bool(f"method_params.{method}.{key}", value)


def _dataset_geometry(dataset: str) -> tuple[int, int]:
    """Spatial dims and channels of the dataset, as far as known without reading images."""
    from trustmap.data.phantoms import PHANTOMS, get_spec

    if dataset in PHANTOMS and not Path(dataset).exists():
        return get_spec(dataset).spatial_dims, 1
    card = _expanded(dataset, "dataset") / "dataset.json"
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
        dims, channels = int(data.get("spatial_dims", 2)), int(data.get("in_channels", 1))
        if dims in (2, 3) and channels >= 1:
            return dims, channels
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return 2, 1


@functools.lru_cache(maxsize=64)
def _skeleton(role: str, arch: str, dims: int, channels: int, kwargs: str) -> Any:
    """The architecture built on the meta device (no weights allocated, no RNG drawn)."""
    import torch

    from trustmap.models import create

    classes = 1 if arch in ("unet", "box_localizer") else 2
    try:
        with torch.device("meta"):
            return create(arch, dims, channels, classes, **json.loads(kwargs))
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ConfigError(
            f"models.{role}.kwargs: {arch} cannot be built with {json.loads(kwargs)} "
            f"({type(err).__name__}: {err})"
        ) from None


@functools.lru_cache(maxsize=256)
def _dry_run(method: str, params: str, dims: int, channels: int, size: int | None) -> None:
    """Run ``method`` once with ``params`` on a small seeded CNN; raise naming the method.

    Cost parameters (:data:`_COST_PARAMS`) above 4 are capped at 4: their valid values
    do not depend on their size. Counterfactual methods are skipped (they need trained
    generators, which their own ``generators`` path names).
    """
    import torch

    from trustmap.core.base import build
    from trustmap.core.registry import get_method
    from trustmap.models import create

    cls = get_method(method)
    if cls.family == "counterfactual":
        return
    values = json.loads(params)
    checked = {
        k: min(v, _CHECK_CAP)
        if k in _COST_PARAMS and isinstance(v, int) and not isinstance(v, bool)
        else v
        for k, v in values.items()
    }
    side = size or 64
    # A method that reads trainable attention needs a model that has some.
    arch = "attention_cnn" if cls.needs == "attention" else "small_cnn"
    model = create(arch, dims, channels, 2, seed=0, width=2).eval()
    x = torch.linspace(0, 1, channels * side**dims).reshape(1, channels, *(side,) * dims)
    try:
        build(cls, model, checked).explain(x, target=1)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method_params.{method}: {err}") from None
