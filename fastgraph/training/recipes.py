"""Training recipes: TOML files of hyperparameters, with units and sources, read once.

A recipe is ``profiles/recipes/<name>.toml`` (shipped as package data and read with
``importlib.resources``) or the path of a user's TOML file. Its hyperparameters are
written in the units of the method's source (airbench's decoupled "per 1024 examples"
form, or PyTorch's own); :func:`torch_hyperparameters` converts them to PyTorch's
conventions in one place, the way airbench's ``hyp`` dict is converted once at the top of
its training function. Every key is checked against :data:`SCHEMA`: an unknown key or a
bad value is a :class:`~fastgraph.core.errors.UserError` naming the file and the key.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastgraph.core.errors import UserError

RECIPE_PACKAGE = "fastgraph.profiles"
RECIPE_FOLDER = "recipes"


# ---------------------------------------------------------------- schema ----------------
# section -> key -> (check, default). A check returns an error text or None. ``REQUIRED``
# marks a key without default. Sections absent from a file take all their defaults.

REQUIRED = object()


def _number(lo=None, hi=None, *, lo_open=False, integer=False) -> Callable[[Any], str | None]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return "an integer" if integer else "a number"
        if not math.isfinite(v):
            return "a finite number"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"{'>' if lo_open else '>='} {lo}"
        if hi is not None and v > hi:
            return f"<= {hi}"
        return None

    return check


def _one_of(*choices) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


def _boolean(v):
    return None if isinstance(v, bool) else "true or false"


def _text(v):
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def _texts(v):
    ok = isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v)
    return None if ok else "a non-empty list of strings"


def _substrings(v):
    ok = isinstance(v, list) and all(isinstance(s, str) and s.strip() for s in v)
    return None if ok else "a list of non-empty strings"


def _numbers(v):
    ok = isinstance(v, list) and len(v) >= 2 and all(
        not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in v)
    return None if ok else "a list of at least two numbers"


def _fraction_below_one(v):
    return _number(0)(v) or (None if v < 1 else ">= 0 and < 1")


def _range(lo, hi):
    """A [low, high] pair of numbers with lo <= low <= high <= hi."""
    def check(v):
        ok = (isinstance(v, list) and len(v) == 2 and not any(_number(lo, hi)(x) for x in v)
              and v[0] <= v[1])
        return None if ok else f"a [low, high] pair with {lo} <= low <= high <= {hi}"
    return check


def _channel_values(v):
    ok = isinstance(v, list) and len(v) == 3 and not any(_number(0, 255)(x) for x in v)
    return None if ok else "three numbers in 0..255 (R, G, B)"


SCHEMA: dict[str, dict[str, tuple[Callable[[Any], str | None], Any]]] = {
    "": {
        "name": (_text, REQUIRED),
        "title": (_text, REQUIRED),
        "sources": (_texts, REQUIRED),
        "model": (_text, REQUIRED),
        "notes": (_text, ""),
    },
    "train": {
        "epochs": (_number(0, lo_open=True), REQUIRED),
        "batch_size": (_number(1, integer=True), REQUIRED),
        "label_smoothing": (_number(0, 1), 0.0),
        "compile": (_boolean, False),  # torch.compile on CUDA (as with --compile)
        "compile_mode": (_one_of("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                         "default"),  # torch.compile's mode
        "precision": (_one_of("fp32", "fp16", "bf16"), "fp32"),  # autocast on CUDA
    },
    "optimizer": {
        "name": (_one_of("sgd", "lars"), "sgd"),  # torch.optim.SGD, or fastgraph.training.lars.LARS
        "units": (_one_of("torch", "decoupled", "summed"), "torch"),
        "lr": (_number(0, lo_open=True), REQUIRED),
        "momentum": (_number(0, 1), 0.9),
        "nesterov": (_boolean, False),
        "weight_decay": (_number(0), 0.0),
        "trust_coefficient": (_number(0, lo_open=True), 0.001),  # LARS eta (You et al. 2017)
        "eps": (_number(0), 0.0),  # LARS: added to the trust ratio's denominator
        # Goyal et al.'s linear scaling rule: lr is for this many images per step and is
        # multiplied by batch_size / reference_batch_size (0: lr as written, at any batch)
        "reference_batch_size": (_number(0, integer=True), 0),
        "decay_bn_and_bias": (_boolean, True),  # false: no weight decay on 1-D parameters (BN, biases)
        # no weight decay on parameters whose name contains one of these (FFCV: ["bn"])
        "no_decay_names": (_substrings, []),
    },
    "muon": {
        "enabled": (_boolean, False),
        "lr": (_number(0, lo_open=True), 0.24),
        "momentum": (_number(0, 1), 0.6),
        "nesterov": (_boolean, True),
        "ns_steps": (_number(1, 99, integer=True), 3),
        "weight_decay": (_number(0), 0.0),
        "normalize_weights": (_boolean, True),
    },
    "schedule": {
        "type": (_one_of("piecewise", "poly"), "piecewise"),
        "knots": (_numbers, REQUIRED),
        "values": (_numbers, REQUIRED),
        "warmup": (_fraction_below_one, 0.0),  # poly: share of all steps spent warming up
        "power": (_number(0, lo_open=True), 2.0),
        "start": (_number(0), 0.0),
        "end": (_number(0), 0.0),
    },
    "ema": {
        "enabled": (_boolean, False),
        "decay": (_number(0, 1), 0.99),
        "every": (_number(1, integer=True), 1),
        "warmup_power": (_number(0), 0.0),
        "lookahead": (_boolean, False),
    },
    "batchnorm": {
        "momentum": (lambda v: None if v is None else _number(0, 1)(v), None),
        "eps": (lambda v: None if v is None else _number(0, lo_open=True)(v), None),
    },
    "augment": {
        "pad": (_number(0, 8, integer=True), 0),
        "pad_mode": (_one_of("reflect", "zeros"), "reflect"),
        "flip": (_one_of("random", "alternate", "none"), "random"),
        "cutout": (_number(0, 32, integer=True), 0),
    },
    "eval": {
        "tta_level": (_one_of(0, 1, 2), 0),
        "batch_size": (_number(1, integer=True), 1000),
        "model": (_one_of("trained", "ema"), "trained"),
    },
    "data": {
        # "cifar10": CIFAR-10 resident on the device (fastgraph.data.load_cifar10);
        # "imagefolder": ImageNet-format folders or tar shards streamed from disk
        # (fastgraph.data.imagenet_stream), RandomResizedCrop + flip, progressive resizing
        "format": (_one_of("cifar10", "imagefolder"), "cifar10"),
        "train_split": (_text, "train"),
        "test_split": (_text, "val"),
        "min_res": (_number(16, 1024, integer=True), 160),  # training resolution (pixels) up to start_ramp
        "max_res": (_number(16, 1024, integer=True), 192),  # ... from end_ramp on
        "start_ramp": (_number(0), 0),  # epochs: the resolution ramps linearly between the two
        "end_ramp": (_number(0), 0),
        "res_step": (_number(1, 256, integer=True), 32),  # resolutions are multiples of this
        "test_res": (_number(16, 1024, integer=True), 224),  # centre crop evaluated (pixels)
        "crop_ratio": (_number(0, 1, lo_open=True), 0.875),  # centre crop side / shorter image side
        "scale": (_range(0, 1), [0.08, 1.0]),  # RandomResizedCrop area fraction
        "ratio": (_range(0.01, 100), [0.75, 1.3333333333333333]),  # RandomResizedCrop aspect ratio
        "mean": (_channel_values, [123.675, 116.28, 103.53]),  # 0..255 units; ImageNet's, torchvision's
        "std": (_channel_values, [58.395, 57.12, 57.375]),
        "workers": (_number(0, 256, integer=True), 8),  # decoding processes per rank
    },
    "stochastic_depth": {
        "survival_last": (_number(0, 1, lo_open=True), 0.5),
        # absent: Huang et al.'s linear decay from 1; given: linear from it at block 1 to survival_last
        "survival_first": (lambda v: None if v is None else _number(0, 1, lo_open=True)(v), None),
    },
}
# (section, key) -> (selector key, value): keys that exist only when the selector in the
# same section has that value. Given otherwise, they are an error; absent, they are left out
# of the recipe (so a recipe's dict holds only what it uses).
ONLY_WITH: dict[tuple[str, str], tuple[str, str]] = {
    ("optimizer", "trust_coefficient"): ("name", "lars"),
    ("optimizer", "eps"): ("name", "lars"),
    ("schedule", "knots"): ("type", "piecewise"),
    ("schedule", "values"): ("type", "piecewise"),
    ("schedule", "warmup"): ("type", "poly"),
    ("schedule", "power"): ("type", "poly"),
    ("schedule", "start"): ("type", "poly"),
    ("schedule", "end"): ("type", "poly"),
    ("data", "train_split"): ("format", "imagefolder"),
    ("data", "test_split"): ("format", "imagefolder"),
    ("data", "min_res"): ("format", "imagefolder"),
    ("data", "max_res"): ("format", "imagefolder"),
    ("data", "start_ramp"): ("format", "imagefolder"),
    ("data", "end_ramp"): ("format", "imagefolder"),
    ("data", "res_step"): ("format", "imagefolder"),
    ("data", "test_res"): ("format", "imagefolder"),
    ("data", "crop_ratio"): ("format", "imagefolder"),
    ("data", "scale"): ("format", "imagefolder"),
    ("data", "ratio"): ("format", "imagefolder"),
    ("data", "mean"): ("format", "imagefolder"),
    ("data", "std"): ("format", "imagefolder"),
    ("data", "workers"): ("format", "imagefolder"),
}
PASS_ITEM_KEYS = ("name",)  # every other key of a [[passes]] item is an option of that pass


# ---------------------------------------------------------------- data -------------------


@dataclass(frozen=True)
class PassStep:
    """One recipe pass: a registered pass name and its keyword options.

    For a pass that needs data, an integer ``images`` option means "N training images,
    normalised": the trainer replaces it by that float32 (N, 3, 32, 32) tensor (the first
    images of each class in turn, so a class-sorted copy of CIFAR-10 is sampled evenly).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: ``sections[section][key]`` holds every key, defaults filled in.

    ``path`` is where it was read from; ``passes`` the graph passes, in order, that turn
    the traced model into the model trained.
    """

    name: str
    path: str
    sections: dict[str, dict[str, Any]]
    passes: tuple[PassStep, ...]

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    @property
    def title(self) -> str:
        """The recipe's one-line title."""
        return self.sections[""]["title"]

    def to_dict(self) -> dict:
        """JSON-ready: every section, and the passes with their options (tensors excluded)."""
        out = {(k or "recipe"): dict(v) for k, v in self.sections.items()}
        out["passes"] = [{"name": p.name, **p.options} for p in self.passes]
        out["path"] = self.path
        return out


@dataclass(frozen=True)
class TorchHyperparameters:
    """Optimiser hyperparameters in PyTorch's conventions, for a mean-reduced loss.

    lr: peak learning rate of ``torch.optim.SGD`` (multiplied by the schedule); with
        ``[optimizer] name = "lars"`` LARS's peak global lr gamma.
    weight_decay: ``torch.optim.SGD``'s ``weight_decay`` (L2, multiplied by the lr); LARS's
        beta (see ``fastgraph.training.lars``).
    momentum, nesterov: as in ``torch.optim.SGD``.
    """

    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float


def torch_hyperparameters(recipe: Recipe, batch_size: int) -> TorchHyperparameters:
    """Convert the recipe's optimiser section to PyTorch SGD's conventions (the one place).

    units = "torch": lr and weight_decay are already ``torch.optim.SGD``'s for a loss
    averaged over the batch. With ``reference_batch_size`` R > 0, lr is the rate for
    batches of R images and scales linearly with the batch (Goyal et al., "Accurate, Large
    Minibatch SGD", 2017, sec. 2.1: "multiply the learning rate by k" for a k times larger
    minibatch): ``lr_torch = lr * batch_size / R``.

    units = "summed" (airbench94_muon.py, Page's code): lr and weight_decay are
    ``torch.optim.SGD``'s for a loss *summed* over the batch (airbench94_muon:
    ``F.cross_entropy(..., reduction="sum")``, head lr 0.67, ``weight_decay=wd/lr``). The
    gradient of the mean is 1/batch_size of the sum's, so::

        lr_torch = lr * batch_size
        weight_decay_torch = weight_decay / batch_size   # lr_torch * wd_torch = lr * wd per step

    units = "decoupled" (airbench, after Page's "How to Train Your ResNet 5"): lr is the
    step size per 1024 examples after dividing out Nesterov momentum's amplification
    ``1 + 1/(1 - momentum)``, and weight_decay is the decay per 1024 examples, independent
    of the lr. With a mean-reduced loss over ``batch_size`` examples::

        lr_torch = lr * batch_size / (1024 * (1 + 1 / (1 - momentum)))
        weight_decay_torch = weight_decay / lr      # so lr_torch * wd_torch is the decay per step,
                                                    # weight_decay * batch_size / kilostep
    """
    opt = recipe["optimizer"]
    if opt["units"] == "torch":
        scale = batch_size / opt["reference_batch_size"] if opt["reference_batch_size"] else 1.0
        return TorchHyperparameters(opt["lr"] * scale, opt["momentum"], opt["nesterov"], opt["weight_decay"])
    if opt["units"] == "summed":
        return TorchHyperparameters(opt["lr"] * batch_size, opt["momentum"], opt["nesterov"],
                                    opt["weight_decay"] / batch_size)
    kilostep = 1024 * (1 + 1 / (1 - opt["momentum"]))
    lr = opt["lr"] * batch_size / kilostep
    return TorchHyperparameters(lr, opt["momentum"], opt["nesterov"], opt["weight_decay"] / opt["lr"])


def poly_factor(progress: float, *, warmup: float, power: float = 2.0, start: float = 0.0,
                end: float = 0.0) -> float:
    """Polynomial decay after a linear warm-up, as a multiple of the peak lr.

    With p = ``progress`` (fraction of all steps, clipped to 0..1; the trainer passes
    step / total_steps, so a warm-up of W epochs out of E is ``warmup = W / E``, W
    fractional or not)::

        p < warmup:  start + (1 - start) * p / warmup                      (linear warm-up)
        otherwise:   end + (1 - end) * (1 - (p - warmup) / (1 - warmup))**power

    1 at the end of the warm-up, ``end`` at p = 1. LARS's global lr: You, Gitman and
    Ginsburg (arXiv:1708.03888, Algorithm 1) decay ``gamma_0 * (1 - t / T)**2``; the warm-up
    is Goyal et al.'s gradual warm-up ("Accurate, Large Minibatch SGD", 2017, sec. 2.2),
    from 0 as ``tensorflow/tpu`` ``models/official/resnet/lars_util.py``
    (``poly_rate_schedule``: ``plr * current_epoch / w_epochs``, then
    ``polynomial_decay(..., power=2.0)``).

    Raises:
        ValueError: ``warmup`` outside [0, 1), ``power`` <= 0, or ``start``/``end`` < 0.
    """
    if not 0 <= warmup < 1 or not power > 0 or start < 0 or end < 0:
        raise ValueError(f"poly schedule needs 0 <= warmup < 1, power > 0, start >= 0, end >= 0; got "
                         f"warmup={warmup}, power={power}, start={start}, end={end}")
    p = min(1.0, max(0.0, float(progress)))
    if p < warmup:
        return start + (1.0 - start) * p / warmup
    return end + (1.0 - end) * (1.0 - (p - warmup) / (1.0 - warmup)) ** power


def lr_factor(recipe: Recipe, progress: float) -> float:
    """The schedule's multiple of the peak lr at ``progress`` (fraction of all steps, 0..1).

    ``type = "piecewise"``: linear through (knots[i], values[i]); a repeated knot makes a
    step (the value jumps to the later one); constant outside the knots. ``type = "poly"``:
    :func:`poly_factor` with the section's ``warmup``, ``power``, ``start`` and ``end``.
    """
    sched = recipe["schedule"]
    if sched.get("type", "piecewise") == "poly":
        return poly_factor(progress, warmup=sched["warmup"], power=sched["power"], start=sched["start"],
                           end=sched["end"])
    knots, values = sched["knots"], sched["values"]
    if progress <= knots[0]:
        return float(values[0])
    for i in range(len(knots) - 1, -1, -1):  # last knot at or before progress: right-continuous steps
        if knots[i] <= progress:
            break
    if i == len(knots) - 1:
        return float(values[-1])
    span = knots[i + 1] - knots[i]
    return float(values[i] + (values[i + 1] - values[i]) * (progress - knots[i]) / span)


# ---------------------------------------------------------------- loading ----------------


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in ``profiles/recipes/``."""
    folder = resources.files(RECIPE_PACKAGE).joinpath(RECIPE_FOLDER)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read(name_or_path: str) -> tuple[str, dict]:
    """(label for messages, parsed TOML) of a shipped recipe name or a TOML file path."""
    text, label = None, name_or_path
    if name_or_path.endswith(".toml") or "/" in name_or_path or Path(name_or_path).is_file():
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        label = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read recipe {path}: {exc}") from None
    else:
        item = resources.files(RECIPE_PACKAGE).joinpath(RECIPE_FOLDER, f"{name_or_path}.toml")
        if not item.is_file():
            raise UserError(f"unknown recipe {name_or_path!r}; shipped recipes: "
                            f"{', '.join(shipped_recipes())}, or give the path of a .toml file")
        label = f"{name_or_path} ({RECIPE_FOLDER}/{name_or_path}.toml)"
        text = item.read_text(encoding="utf-8")
    try:
        return label, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"recipe {label}: invalid TOML: {exc}") from None


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _check_knots(label: str, sched: dict) -> None:
    """Raise ``UserError`` unless a piecewise schedule's knots rise from 0 to 1 with one value each, >= 0."""
    if len(sched["knots"]) != len(sched["values"]):
        raise UserError(f"recipe {label}: 'schedule.knots' and 'schedule.values' differ in length "
                        f"({len(sched['knots'])} vs {len(sched['values'])})")
    knots = sched["knots"]
    if knots[0] != 0 or knots[-1] != 1 or any(b < a for a, b in zip(knots, knots[1:], strict=False)):
        raise UserError(f"recipe {label}: 'schedule.knots' must rise from 0 to 1 (fractions of "
                        f"training), got {knots}")
    if any(v < 0 for v in sched["values"]):
        raise UserError(f"recipe {label}: 'schedule.values' must be >= 0, got {sched['values']}")


def same_recipe(saved: dict, current: dict) -> bool:
    """Whether ``saved`` (a checkpoint's ``Recipe.to_dict()``) is the recipe ``current``
    (this one's): equal once the keys the schema gained since the checkpoint was written
    (``optimizer.name``, ``schedule.type``, the ``[data]`` section...) are filled in where
    ``current`` holds their defaults, so an upgrade of fastgraph does not refuse to resume an
    unchanged recipe."""
    filled = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for name, keys in SCHEMA.items():
        section = name or "recipe"
        old, new = filled.get(section), current.get(section)
        if old is None and isinstance(new, dict) and all(new[k] == keys[k][1] for k in new if k in keys):
            filled[section] = dict(new)  # a section the schema gained, at its defaults
            continue
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        for key, (_, default) in keys.items():
            if key not in old and key in new and new[key] == default:
                old[key] = default
    return filled == current


def validate(label: str, data: dict) -> Recipe:
    """Check parsed TOML against :data:`SCHEMA` and fill in defaults.

    Raises:
        UserError: one line naming ``label`` and the first unknown key, missing key or bad
            value, with what was expected.
    """
    sections: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = data if section == "" else data.get(section, {})
        if section and not isinstance(given, dict):
            raise UserError(f"recipe {label}: [{section}] must be a table")
        known = set(keys) | ({"passes"} | set(SCHEMA) - {""} if section == "" else set())
        for key in given:
            if key not in known:
                raise UserError(f"recipe {label}: unknown key {_dotted(section, key)!r}; known keys "
                                f"{'at the top' if not section else f'in [{section}]'}: "
                                f"{', '.join(sorted(known))}")
        values = {}
        for key, (check, default) in keys.items():
            if (section, key) in ONLY_WITH:
                selector, wanted = ONLY_WITH[section, key]
                chosen = given.get(selector, keys[selector][1])
                if chosen != wanted:
                    if key in given:
                        raise UserError(f"recipe {label}: {_dotted(section, key)!r} applies only with "
                                        f"{_dotted(section, selector)} = {wanted!r}, not {chosen!r}")
                    continue
            if key not in given:
                if default is REQUIRED:
                    raise UserError(f"recipe {label}: missing key {_dotted(section, key)!r}")
                values[key] = default
                continue
            problem = check(given[key])
            if problem is not None:
                raise UserError(f"recipe {label}: {_dotted(section, key)!r} must be {problem}, "
                                f"got {given[key]!r}")
            values[key] = given[key]
        sections[section] = values

    opt = sections["optimizer"]
    if opt["name"] == "lars" and opt["units"] != "torch":
        raise UserError(f"recipe {label}: 'optimizer.name' \"lars\" takes lr and weight_decay in "
                        f"PyTorch's units (units = \"torch\"), got units = {opt['units']!r}")
    if opt["reference_batch_size"] and opt["units"] != "torch":
        raise UserError(f"recipe {label}: 'optimizer.reference_batch_size' scales an lr in PyTorch's units "
                        f"(units = \"torch\"), got units = {opt['units']!r}")
    if opt["name"] == "lars" and sections["muon"]["enabled"]:
        raise UserError(f"recipe {label}: 'optimizer.name' \"lars\" does not combine with [muon] enabled")
    sched = sections["schedule"]
    if sched["type"] == "piecewise":
        _check_knots(label, sched)
    data_cfg = sections["data"]
    if data_cfg["format"] == "imagefolder":
        aug = sections["augment"]
        if aug["pad"] or aug["cutout"] or aug["flip"] == "alternate":
            raise UserError(f"recipe {label}: [data] format \"imagefolder\" augments with RandomResizedCrop "
                            "and a random flip: set augment.pad = 0, augment.cutout = 0 and augment.flip to "
                            "\"random\" or \"none\"")
        if data_cfg["min_res"] > data_cfg["max_res"] or data_cfg["start_ramp"] > data_cfg["end_ramp"]:
            raise UserError(f"recipe {label}: [data] needs min_res <= max_res and start_ramp <= end_ramp")
    if sections["eval"]["model"] == "ema" and not sections["ema"]["enabled"]:
        raise UserError(f"recipe {label}: 'eval.model' is \"ema\" but [ema] is not enabled")

    passes = []
    items = data.get("passes", [])
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise UserError(f"recipe {label}: 'passes' must be an array of tables ([[passes]])")
    for i, item in enumerate(items):
        name = item.get("name")
        if _text(name) is not None:
            raise UserError(f"recipe {label}: 'passes[{i}].name' must be a non-empty string")
        passes.append(PassStep(name, {k: v for k, v in item.items() if k not in PASS_ITEM_KEYS}))
    return Recipe(sections[""]["name"], label, sections, tuple(passes))


def load_recipe(name_or_path: str) -> Recipe:
    """Read and validate a recipe: a shipped name (``page2019``) or a path to a TOML file.

    Raises:
        UserError: unknown recipe name, missing or unreadable file, invalid TOML, or a
            key or value the schema rejects (one line naming the file and the key).
    """
    label, data = _read(name_or_path)
    return validate(label, data)


def check_passes_registered(recipe: Recipe) -> None:
    """Raise ``UserError`` naming the recipe and pass when a recipe pass is not registered."""
    from fastgraph import passes as registry

    for step in recipe.passes:
        if step.name not in registry.REGISTRY:
            raise UserError(f"recipe {recipe.path}: unknown pass {step.name!r} in [[passes]]; "
                            f"known passes: {', '.join(sorted(registry.REGISTRY))}")
