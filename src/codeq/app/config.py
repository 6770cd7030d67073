"""The experiment YAML: one typed schema, its loader, ``--set`` overrides and clear errors.

The schema below is the single source of truth for every key: its type, default, range and
doc. Keys that name a registered part (model, data set, quantizer, loss term, optimizer,
scheduler) are checked against that part's registry when a config is validated, after the
config's ``plugins`` are imported, so the valid choices are whatever is registered then.
``python -m codeq.app.config`` prints the README's YAML reference from the schema and the registries.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from codeq import budget
from codeq.app.plugins import import_plugins
from codeq.data.base import DATASET_REGISTRY
from codeq.data.on_device import DEVICE_DATA
from codeq.errors import ConfigError, first_line
from codeq.models import MODEL_REGISTRY
from codeq.optim import OPTIMIZER_REGISTRY, SCHEDULER_REGISTRY
from codeq.quantizers import QUANTIZER_REGISTRY
from codeq.quantizers.base import check_quantizer
from codeq.registry import Registry
from codeq.regularizers import LOSS_REGISTRY

log = logging.getLogger(__name__)

# Which registry a key's value is a name from; the YAML reference lists each one's entries.
REGISTRIES: dict[str, Registry] = {
    "model": MODEL_REGISTRY, "dataset": DATASET_REGISTRY, "quantizer.name": QUANTIZER_REGISTRY,
    "loss_terms[].name": LOSS_REGISTRY, "optimizer.type": OPTIMIZER_REGISTRY, "lr_scheduler.type": SCHEDULER_REGISTRY,
}
# Sections that may be written as a bare string: the string is the value of this key of the mapping.
SHORTHANDS = {"quantizer": "name", "lr_scheduler": "type"}


# Marks a key that only says how a run executes, not what it computes: it may differ when a run resumes.
RUNTIME = {"runtime": True}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def no_booleans_for_numbers(cls, data: Any) -> Any:
        """YAML 1.1 reads yes/no/on/off as booleans, which pydantic would take as 1/0 for a number."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(field.alias or name, data.get(name))
                if isinstance(value, bool) and "bool" not in str(field.annotation):
                    raise ConfigError(field.alias or name, f"got the boolean {value!r} where "
                                      f"{annotation_text(field.annotation)} is expected (YAML reads yes/no/on/off as "
                                      f"booleans)", "write a number")
        return data


class QuantizerConfig(Section):
    name: str = Field(description="quantizer (`deadzone` is CoDeQ)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the quantizer class")
    exclude_layers: list[str] = Field(
        default_factory=list, description="modules whose name contains any of these strings stay FP32; an entry "
        "`re:PATTERN` is a regular expression matched against the whole name, e.g. `re:^(conv1|fc)$`, and an entry "
        "`type:CLASS` names the module's class or a base class, e.g. `type:BatchNorm2d`, `type:LayerNorm`"
    )


class GroupOptions(Section):
    lr: float = Field(1e-3, ge=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (decoupled for adamw)")
    momentum: float | None = Field(None, ge=0, description="sgd momentum")
    nesterov: bool | None = Field(None, description="sgd Nesterov momentum")
    betas: tuple[float, float] | None = Field(None, description="adam/adamw betas")
    eps: float | None = Field(None, gt=0, description="adam/adamw epsilon")

    def optimizer_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ParamGroups(Section):
    base: GroupOptions = Field(description="every parameter not in `dz` or `bit`")
    dz: GroupOptions | None = Field(None, description="parameters named `*logit_dz*`; absent: they join `base`")
    bit: GroupOptions | None = Field(None, description="parameters named `*logit_bit*`; absent: they join `base`")


class OptimizerConfig(Section):
    type: str = Field("adamw", description="optimizer")
    param_groups: ParamGroups = Field(description="per-group options, passed straight to the optimizer")


class LossTermConfig(Section):
    name: str = Field(description="loss term")
    weight: float = Field(1.0, alias="lambda", description="the term is added as `lambda * fn(model, **kwargs)`")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the loss function")


class SchedulerConfig(Section):
    """``type`` plus that schedule's own arguments as further keys (``eta_min``, ``step_size``, ``gamma``,
    ``milestones``), checked against its signature."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type: str = Field("cosine", description="learning-rate schedule, stepped once per epoch over `epochs - "
                      "warmup_epochs` (cosine: T_max); the arguments in brackets are further `lr_scheduler` keys")
    warmup_epochs: int = Field(0, ge=0, description="epochs of linear warm-up before the schedule")
    warmup_start_factor: float = Field(0.1, gt=0, le=1, description="warm-up starts at this share of each lr")

    def schedule_kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ReportConfig(Section):
    activation_bits: int = Field(32, ge=1, le=32, description="activation bit-width that BOPs count (32: not "
                                 "quantized); Rel. BOPs stays relative to 32-bit weights and activations")
    fp_weight_bits: int = Field(32, ge=1, le=32, description="weight bit-width that BOPs count for layers left in FP32")


class TargetConfig(Section):
    """A compression budget the run steers its pressure to (``codeq.budget``, docs/budget.md): exactly one of
    ``sparsity``, ``rel_bops``, ``size_bytes``, and the controller's settings."""

    sparsity: float | None = Field(None, gt=0, lt=1, description="share of the quantized weights that end exactly "
                                   "zero (met within ±0.01)")
    rel_bops: float | None = Field(None, gt=0, le=1, description="Rel. BOPs as the report counts them, a fraction "
                                   "(met within ±5 %)")
    size_bytes: int | None = Field(None, gt=0, description="the report's compressed size in bytes (met within ±5 %)")
    ramp: float = Field(budget.RAMP, ge=0, le=1, description="share of the training steps over which the target "
                        "moves from the model's starting value to the budget (cubic, Zhu & Gupta 2017)")
    interval: int | None = Field(None, ge=1, description=f"training steps between updates of the pressure; null: "
                                 f"the run's steps / {budget.UPDATES}")
    proportional_gain: float = Field(budget.PROPORTIONAL_GAIN, ge=0, description="K_P of the update of the log "
                                     "pressure factor")
    integral_gain: float = Field(budget.INTEGRAL_GAIN, ge=0, description="K_I of the update of the log pressure "
                                 "factor, per run")
    horizon: float = Field(budget.HORIZON, ge=0, le=1, description="share of the training steps the update looks "
                           "ahead: it compares the measured value, extrapolated along its recent trend, with the "
                           "target in force that much later, so the pressure eases before an overshoot")
    max_factor: float = Field(budget.MAX_FACTOR, ge=1, description="the pressure stays within its starting value "
                              "divided or multiplied by this")

    @model_validator(mode="after")
    def one_budget(self) -> TargetConfig:
        given = [metric for metric in budget.METRICS if getattr(self, metric) is not None]
        if len(given) != 1:
            raise ConfigError("", f"gives {' and '.join(given) if given else 'no budget'}",
                              f"give exactly one of {', '.join(budget.METRICS)}")
        return self

    @property
    def metric(self) -> str:
        return next(metric for metric in budget.METRICS if getattr(self, metric) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.metric))


# The reference implementation's top-level keys, read as aliases (None: accepted, no effect).
REFERENCE_ALIASES = {"default_activation_bitrate": "activation_bits", "default_weight_bitrate": "fp_weight_bits",
                     "eval_bobs": None}


def reference_aliases(data: Any) -> Any:
    """``data`` with the REFERENCE_ALIASES keys moved into ``report``, each with a logged notice."""
    if not isinstance(data, dict) or not data.keys() & REFERENCE_ALIASES.keys():
        return data
    data, report = dict(data), dict(data.get("report") or {})
    for alias, key in REFERENCE_ALIASES.items():
        if alias not in data:
            continue
        value = data.pop(alias)
        if key is None:
            log.info("config: %s is the reference implementation's key; Rel. BOPs are logged every epoch anyway, so "
                     "it has no effect", alias)
        elif report.get(key, value) != value:
            raise ConfigError(alias, f"says {value!r} but report.{key} says {report[key]!r}", "keep one of the two")
        else:
            report[key] = value
            log.info("config: %s (the reference implementation's key) is read as report.%s: %r", alias, key, value)
    data["report"] = report
    return data


class TrainConfig(Section):
    plugins: list[str] = Field(default_factory=list, description="Python files or module names imported before "
                               "the rest is checked; what they register is valid here (paths recorded absolute)")
    model: str = Field(description="model")
    pretrained: bool = Field(False, description="start from the published ImageNet weights of a torchvision or timm "
                             "model, read from the local cache only (never downloaded); a head for another number of "
                             "classes starts fresh, with a notice")
    init_from: str | None = Field(None, description="weights loaded before the quantizers are attached: a run "
                                  "directory (its last.pt) or checkpoint of this tool, FP32 or QAT, or a state_dict "
                                  "file as torchvision and timm save them (also under `state_dict` or `model`); keys "
                                  "of another shape are skipped with a notice. Optimizer, schedule and epochs start "
                                  "fresh (unlike --resume); the path is recorded absolute")
    epochs: int = Field(ge=1, description="training epochs (also the cosine T_max)", json_schema_extra=RUNTIME)
    batch_size: int = Field(ge=1, description="batch size per process")
    img_size: int = Field(32, ge=1, description="input resolution the data is resized to")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or mps; `--device` overrides it",
                        json_schema_extra=RUNTIME)
    wandb_project: str | None = Field(None, description="W&B project; null disables W&B")
    workers: int = Field(4, ge=0, description="data-loader worker processes", json_schema_extra=RUNTIME)
    pin_memory: bool | None = Field(None, description="page-locked host memory for batches (faster copies to a GPU); "
                                    "null: on when the device is CUDA", json_schema_extra=RUNTIME)
    persistent_workers: bool = Field(True, description="keep the loader's workers alive from epoch to epoch (with "
                                     "workers > 0)", json_schema_extra=RUNTIME)
    prefetch_factor: int = Field(2, ge=1, description="batches each loader worker prepares ahead (with workers > 0)",
                                 json_schema_extra=RUNTIME)
    use_compile: bool = Field(False, description="wrap the model in torch.compile", json_schema_extra=RUNTIME)
    amp: Literal["bf16", "fp16"] | None = Field(
        None, description="autocast forward and loss to bf16 or fp16 (fp16 adds a GradScaler); null: FP32. "
        "Weights, quantizers and optimizer stay FP32", json_schema_extra=RUNTIME)
    channels_last: bool = Field(False, description="channels-last memory format for model and input batches "
                                "(faster convolutions with cuDNN, notably under amp)", json_schema_extra=RUNTIME)
    data_on_device: bool = Field(False, description="hold the whole data set on the device and augment there "
                                 "(cifar10, cifar100: random crop, padding 4, and flip); no loader workers, so a small "
                                 "host cannot starve the GPU", json_schema_extra=RUNTIME)
    quantizer: QuantizerConfig | None = Field(None, description="weight quantizer; null trains the FP32 baseline")
    optimizer: OptimizerConfig = Field(description="optimizer and its parameter groups")
    loss_terms: list[LossTermConfig] = Field(default_factory=list, description="regularisers added to the loss")
    lr_scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="a schedule name (shorthand for `{type: NAME}`) or a mapping"
    )
    bn_recalibration_batches: int = Field(
        5, ge=0, description="training batches (per process) on which BatchNorm's running statistics are re-estimated "
        "with the quantized weights before each validation, so val_acc, best.pt and every checkpoint hold statistics "
        "that match their weights; 0: off (training's running averages, which lag a growing dead zone). Models "
        "without BatchNorm skip it. Not a run-time key: it changes val_acc and the checkpoints, not the weights")
    dataset: str = Field("cifar10", description="data set")
    data_dir: str = Field("./data", description="where the data set lives or is downloaded to",
                          json_schema_extra=RUNTIME)
    seed: int = Field(42, description="seed for python, numpy, torch and the data order")
    save_dir: str = Field("runs", description="run directories are created under it", json_schema_extra=RUNTIME)
    log_interval: int = Field(50, ge=1, description="steps between progress lines when stdout is not a terminal",
                              json_schema_extra=RUNTIME)
    run_name: str | None = Field(None, description="name of the run directory and W&B run, a template over config "
                                 "keys in braces, e.g. `\"{model}_dzwd{optimizer.param_groups.dz.weight_decay}\"`; "
                                 "null: `<model>_<quantizer><bits>b_e<epochs>_lr<lr>` (+ `_<metric><value>` with a "
                                 "`target`, + `_gb<global batch>` under DDP); the bits are max_bits when the "
                                 "bit-width is learned")
    target: TargetConfig | None = Field(None, description="a compression budget the run adjusts the dead-zone (and "
                                        "bit-width) pressure to reach, starting from the configured weight decay "
                                        "or lambda: exactly one of sparsity, rel_bops, size_bytes (docs/budget.md); "
                                        "null: the pressure stays as configured")
    report: ReportConfig = Field(default_factory=ReportConfig, json_schema_extra=RUNTIME, description="how reports "
                                 "count BOPs; aliases: `default_activation_bitrate`, `default_weight_bitrate`, "
                                 "`eval_bobs` (no effect) at the top level")

    _reference_aliases = model_validator(mode="before")(reference_aliases)

    @model_validator(mode="before")
    @classmethod
    def shorthands(cls, data: Any) -> Any:
        """``quantizer: deadzone`` and ``lr_scheduler: cosine`` mean ``{name: deadzone}`` and ``{type: cosine}``;
        a null scheduler is a constant learning rate."""
        if isinstance(data, dict):
            data = {**data, **{key: {field: data[key]} for key, field in SHORTHANDS.items()
                               if isinstance(data.get(key), str)}}
            if "lr_scheduler" in data and data["lr_scheduler"] is None:
                data["lr_scheduler"] = {"type": "constant"}
        return data

    @field_validator("init_from")
    @classmethod
    def absolute_path(cls, path: str | None) -> str | None:
        """Recorded absolute, so --resume and reports find the same file from any directory."""
        return None if path is None else str(Path(path).expanduser().resolve())

    @model_validator(mode="after")
    def known_names(self) -> TrainConfig:
        MODEL_REGISTRY.choose("model", self.model)
        DATASET_REGISTRY.choose("dataset", self.dataset)
        if self.data_on_device and self.dataset not in DEVICE_DATA:
            raise ConfigError("data_on_device", f"not available for data set {self.dataset!r}",
                              f"set it to false (it serves {', '.join(DEVICE_DATA)})")
        OPTIMIZER_REGISTRY.choose("optimizer.type", self.optimizer.type)
        for index, term in enumerate(self.loss_terms):
            loss = LOSS_REGISTRY.choose(f"loss_terms.{index}.name", term.name)
            term.kwargs = check_kwargs(f"loss_terms.{index}.kwargs", loss, term.kwargs, skip=1)
        schedule = SCHEDULER_REGISTRY.choose("lr_scheduler.type", self.lr_scheduler.type)
        converted = check_kwargs("lr_scheduler", schedule, self.lr_scheduler.schedule_kwargs(), skip=3)
        self.lr_scheduler = SchedulerConfig(type=self.lr_scheduler.type, warmup_epochs=self.lr_scheduler.warmup_epochs,
                                            warmup_start_factor=self.lr_scheduler.warmup_start_factor, **converted)
        if self.run_name is not None:
            render_run_name(self.run_name, config_to_dict(self))
        return self


def check_kwargs(key: str, target: Any, kwargs: dict[str, Any], skip: int = 0) -> dict[str, Any]:
    """Check ``kwargs`` against ``target``'s signature (names, required ones, annotated types),
    ignoring its first ``skip`` parameters; returns them converted to the annotated types."""
    params = list(inspect.signature(target).parameters.values())[skip:]
    accepted = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    owner = target.__qualname__.removesuffix(".__init__")
    for name in kwargs:
        if name not in accepted:
            raise ConfigError(f"{key}.{name}", "unknown argument", suggest(name, accepted, f"{owner} takes"))
    for name, param in accepted.items():
        if param.default is inspect.Parameter.empty and name not in kwargs:
            raise ConfigError(f"{key}.{name}", "required argument missing", f"add `{name}: <value>` under {key}")
    hints = typing.get_type_hints(target)
    converted = dict(kwargs)
    for name, value in kwargs.items():
        if name not in hints:
            continue
        try:
            converted[name] = TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as error:
            problem = f"{error.errors()[0]['msg'].lower()} (got {value!r})"
            fix = f"{owner} takes {name}: {annotation_text(hints[name])}"
            raise ConfigError(f"{key}.{name}", problem, fix) from None
    return converted


def annotation_text(annotation: Any) -> str:
    """A type annotation as a reader writes it: ``int``, ``str | None``, ``list[LossTermConfig]``."""
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return re.sub(r"\b(?:[a-z_]\w*\.)+(?=[A-Z])", "", text)  # module paths of classes: codeq.app.config.X -> X


def suggest(name: str, choices: Any, prefix: str = "valid keys are") -> str:
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}{prefix}: {', '.join(choices)}"


def parse_overrides(overrides: list[str], data: dict[str, Any]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars) to the raw config."""
    for override in overrides:
        path, sep, text = override.partition("=")
        path, text = path.strip(), text.strip()  # `--set "epochs = 3"`
        if not sep or not path or any(not part for part in path.split(".")):
            raise ConfigError("--set", f"malformed override {override!r}", "write it as --set key.path=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(path, f"--set value {text!r} is not valid YAML", "quote it or fix the syntax") from None
        node = data
        *parents, leaf = path.split(".")
        for depth, part in enumerate(parents):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(path, f"--set: no list element {part}", f"use an index below {len(node)}")
                node = node[int(part)]
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if isinstance(child, str) and node is data and part in SHORTHANDS:  # `lr_scheduler: cosine`
                child = node[part] = {SHORTHANDS[part]: child}
            if not isinstance(child, (dict, list)):
                raise ConfigError(path, f"--set: {'.'.join(parents[:depth + 1])} is not a mapping", "set a leaf key")
            node = child
        if isinstance(node, list):
            if not leaf.isdigit() or int(leaf) >= len(node):
                raise ConfigError(path, f"--set: no list element {leaf}", f"use an index below {len(node)}")
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return data


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(str(key), f"given twice, on lines {seen[key]} and {line}",
                                  "keep one of them (the YAML loader would silently use the last)")
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` of ``text``, refusing duplicate keys (ConfigError naming the key and both lines)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in YAML file ``path``.

    Raises:
        ConfigError: no such file (or a directory), unreadable, a syntax error, a duplicate key, or not a mapping.
    """
    source = str(path)
    file = Path(path)
    if not file.is_file():
        problem = ("is a directory" if file.is_dir() else "is not a regular file" if file.exists() else
                   "file not found")
        raise ConfigError("", problem, "pass an existing YAML file to --config", source)
    try:
        data = parse_yaml(file.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("", f"cannot read the file ({type(error).__name__})", "check its permissions and encoding",
                          source) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise ConfigError("", f"YAML syntax error at {where}{problem}", "fix the YAML syntax", source) from None
    if data is None:
        raise ConfigError("", "the file is empty", "start from configs/quickstart.yaml", source)
    if not isinstance(data, dict):
        raise ConfigError("", f"top level is a {type(data).__name__}, not a mapping", "write `key: value` lines",
                          source)
    return data


def validation_error_to_config_error(error: ValidationError) -> ConfigError:
    """The first pydantic error, rephrased as a one-line ConfigError."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = TrainConfig
        for part in first["loc"][:-1]:
            parent = section_class(parent, part) or parent
        names = [f.alias or n for n, f in parent.model_fields.items()]
        return ConfigError(key, "unknown key", suggest(str(first["loc"][-1]), names))
    context = first.get("ctx", {})
    if "error" in context and isinstance(context["error"], ConfigError):
        inner = context["error"]
        prefix = ".".join(str(part) for part in first["loc"])
        return ConfigError(".".join(part for part in (prefix, inner.key) if part), inner.problem, inner.fix)
    field = field_at(first["loc"])
    about = f"{first['loc'][-1]} is {annotation_text(field.annotation)}: {field.description}" if field else ""
    if kind == "missing":
        return ConfigError(key, "required key missing", f"add it ({about})" if about else "add it")
    return ConfigError(key, f"{first['msg'].lower()} (got {first.get('input')!r})",
                       about or "see the YAML reference in README.md")


def field_at(loc: tuple[Any, ...]) -> Any:
    """The schema field a pydantic error location points at (list indices skipped), or None."""
    model: type[BaseModel] | None = TrainConfig
    field = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or str(part) not in model.model_fields:
            return None
        field = model.model_fields[str(part)]
        model = section_class(model, part)
    return field


def section_class(parent: type[BaseModel], part: Any) -> type[BaseModel] | None:
    field = parent.model_fields.get(str(part))
    if field is None:
        return None
    for candidate in getattr(field.annotation, "__args__", ()) + (field.annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in getattr(candidate, "__args__", ()):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def validate_config(data: dict[str, Any]) -> TrainConfig:
    """Build the typed config from raw YAML data: import its plugins, then check every key and name.

    Raises:
        ConfigError: the first problem found, naming its key.
    """
    data = {**data, "plugins": import_plugins(data.get("plugins"))}
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as error:
        raise validation_error_to_config_error(error) from None
    if config.quantizer is not None:
        quantizer_cls = QUANTIZER_REGISTRY.choose("quantizer.name", config.quantizer.name)
        check_quantizer(config.quantizer.name, quantizer_cls)  # also entries put in with dict.update and the like
        kwargs = check_kwargs("quantizer.kwargs", quantizer_cls.__init__, config.quantizer.kwargs, skip=1)
        config.quantizer.kwargs = kwargs
        try:
            quantizer_cls(**kwargs)
        except (TypeError, ValueError) as error:
            culprit = first_mentioned(str(error), kwargs or inspect.signature(quantizer_cls.__init__).parameters)
            key = f"quantizer.kwargs.{culprit}" if culprit else "quantizer.kwargs"
            raise ConfigError(key, str(error), f"set {key} within the allowed range") from None
    return config


def first_mentioned(message: str, names: Any) -> str | None:
    """The name in ``names`` that ``message`` mentions first (the argument an error is about)."""
    positions = {name: message.find(name) for name in names if name in message}
    return min(positions, key=positions.get) if positions else None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a config file; every problem raises a ConfigError naming the file."""
    try:
        data = parse_overrides(list(overrides or []), read_yaml(path))
        return validate_config(data)
    except ConfigError as error:
        error.source = error.source or str(path)
        raise ConfigError(error.key, error.problem, error.fix, error.source) from None


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-able data, keys spelled as in the file."""
    return config.model_dump(mode="json", by_alias=True)


def runtime_keys() -> list[str]:
    """Top-level keys marked RUNTIME: how a run executes, free to change when it resumes."""
    return [name for name, field in TrainConfig.model_fields.items() if (field.json_schema_extra or {}).get("runtime")]


RUN_NAME_CHARACTERS = r"[\w.=+-]+"


def render_run_name(template: str, resolved: dict[str, Any]) -> str:
    """``template`` with each ``{dotted.key}`` replaced by that key's value in the resolved config.

    Raises:
        ConfigError: a placeholder names no config key, or the name holds characters a directory name should not.
    """
    flat = flatten(resolved)

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key not in flat:
            close = difflib.get_close_matches(key, list(flat), n=1)
            raise ConfigError("run_name", f"{{{key}}} names no config key", (f"did you mean {{{close[0]}}}? " if close
                              else "") + "placeholders are dotted keys such as {model} or {optimizer.type}")
        return str(flat[key])

    name = re.sub(r"\{([^{}]*)\}", value, template)
    if not re.fullmatch(RUN_NAME_CHARACTERS, name):
        raise ConfigError("run_name", f"{name!r} cannot be a directory name", "use letters, digits and _.=+- only")
    return name


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c.0.d": 2}``."""
    if not isinstance(data, (dict, list)) or not data:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items() if isinstance(data, dict) else enumerate(data):
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# Keys added since configs were first saved: a saved config without one ran with this value, not the default.
LEGACY_VALUES = {"bn_recalibration_batches": 0}


def saved_value(saved: dict[str, Any], key: str) -> Any:
    """Top-level ``key`` of a config saved by this tool, by any version: what that run did."""
    return saved[key] if key in saved else LEGACY_VALUES.get(key, TrainConfig.model_fields[key].default)


def config_differences(current: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, run-time keys left out (a key ``saved`` lacks
    because it was written before the key existed counts with its LEGACY_VALUES value)."""
    runtime = set(runtime_keys())
    mine, theirs = flatten(current), flatten({**LEGACY_VALUES, **saved})
    return [key for key in sorted(mine.keys() | theirs.keys())
            if key.split(".")[0] not in runtime and mine.get(key, "<absent>") != theirs.get(key, "<absent>")]


def yaml_reference(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Markdown table rows documenting every key of ``model`` (recursing into sections)."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        default = "required" if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        default = default if default == "required" else f"`{default!r}`"
        type_name = annotation_text(field.annotation)
        description = field.description or ""
        if key in REGISTRIES:
            description += f"; one of: {', '.join(choice_text(key, name) for name in REGISTRIES[key].choices())}"
        cells = [f"`{key}`", type_name, default, description]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        nested = section_class(model, name)
        if nested is not None:
            rows += yaml_reference(nested, key + ("[].") if "list" in type_name else key + ".")
    return rows


def choice_text(key: str, name: str) -> str:
    """A registry entry as the YAML reference lists it; a schedule with the arguments its config keys set."""
    if key != "lr_scheduler.type" or name not in SCHEDULER_REGISTRY:
        return f"`{name}`"
    arguments = list(inspect.signature(SCHEDULER_REGISTRY[name]).parameters)[3:]
    return f"`{name}`" + (f" ({', '.join(arguments)})" if arguments else "")


def markdown_reference() -> str:
    header = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(header + yaml_reference()) + "\n"


README_MARKERS = ("<!-- yaml-reference:start -->\n", "<!-- yaml-reference:end -->")


def readme_with_reference(readme: str) -> str:
    """``readme`` with the text between the YAML-reference markers replaced by the generated table."""
    start, end = README_MARKERS
    head, found_start, rest = readme.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found_start and found_end):
        raise ValueError(f"README lacks the markers {start.strip()} ... {end}")
    return head + start + markdown_reference() + end + tail


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the YAML reference, or write it into README.md.")
    parser.add_argument("--write", metavar="README", help="update the table between the markers of this file")
    arguments = parser.parse_args()
    if arguments.write:
        readme_path = Path(arguments.write)
        readme_path.write_text(readme_with_reference(readme_path.read_text()))
    else:
        print(markdown_reference(), end="")
