"""LoRA adapters in PEFT's file format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys in the file are ``base_model.model.<module name>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight``
(``[out, r]``), where ``<module name>`` is the layer's name in the transformers model (PEFT drops the adapter
name, ``default``, from the keys it writes). ``peft.PeftModel.from_pretrained(base, dir)`` loads what
:func:`save_adapter` writes, and :func:`load_adapter` loads what PEFT's ``save_pretrained`` writes for plain
LoRA adapters (no DoRA, no trained biases). Modules trained whole beside the adapters (``modules_to_save``, e.g.
a reward model's ``score`` head) are written as PEFT writes them, ``base_model.model.<module name>.<parameter>``,
and read back into the same modules. The LoRA of mixture-of-experts projections
(:class:`~qlora_kernels.nn.experts.NF4Experts`) is written and read as PEFT's ``target_parameters`` adapters
(the layout: :mod:`qlora_kernels.hf.experts`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from ..dtypes import FLOAT_DTYPES
from ..nn.experts import NF4Experts
from ..nn.lora_args import check_lora_args, is_lora_alpha, is_lora_rank, lora_scaling
from . import experts as moe
from .apply import adopt_bnb4_layout, drop_bnb4_state, freeze_all_but_lora, make_lora
from .layers import LORA_TYPES, linear_layer_names, linear_modules, replace_module

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_config", "load_adapter", "save_adapter"]


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers: :class:`QLoraLinear` and :class:`~qlora_kernels.hf.DenseLoraLinear`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The shortest faithful ``target_modules`` for PEFT: the layers' last name components when those select
    exactly these layers among the model's linear layers, else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in linear_layer_names(model) if n.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(names) else sorted(names)


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """PEFT's ``adapter_config.json`` fields for the adapters of ``model`` (what :func:`save_adapter` writes):
    ``peft_type`` LORA; ``r``, ``lora_alpha`` and ``lora_dropout`` as the most common values with per-layer
    ``rank_pattern`` / ``alpha_pattern`` for the others; ``target_modules`` (and ``target_parameters`` for experts);
    ``modules_to_save``; ``fan_in_fan_out`` for GPT-2's Conv1D; ``task_type`` from the model's head.

    Raises:
        ValueError: no adapted layer, mixed ``use_rslora``, or experts LoRA with another r / alpha than the rest.
    """
    layers = _lora_layers(model)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, NF4Experts) and m.r > 0}
    if not layers and not experts:
        raise ValueError(f"model ({type(model).__name__}) has no QLoraLinear / DenseLoraLinear layers: call "
                         f"apply_qlora first")
    every = [*layers.values(), *experts.values()]
    rslora = {m.use_rslora for m in every}
    if len(rslora) > 1:
        raise ValueError("save_adapter needs one use_rslora setting for all layers; the model mixes True and False")
    r = Counter(m.r for m in every).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in every).most_common(1)[0][0]
    dropout = Counter(m.lora_dropout for m in every).most_common(1)[0][0]
    odd = [n for n, m in experts.items() if (m.r, m.lora_alpha) != (r, alpha)]
    if odd:
        raise ValueError(f"save_adapter writes experts LoRA with the adapter's r={r} and lora_alpha={alpha} (PEFT's "
                         f"target_parameters take no per-module pattern here); {odd[:3]} have other values")
    target_parameters = [f"{name}.{proj}" for name, m in experts.items()
                         for proj in moe.peft_keys(name, tuple(m.lora_A))]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None) or None
    has_lm_head = callable(getattr(model, "get_output_embeddings", None)) and model.get_output_embeddings() is not None
    task = "CAUSAL_LM" if has_lm_head else "SEQ_CLS" if type(model).__name__.endswith(
        "ForSequenceClassification") else None
    saved = list(getattr(model, "qlora_modules_to_save", ()))
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, list(layers)) if layers else [],
        "target_parameters": sorted(target_parameters) or None,
        "exclude_modules": None,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
        "use_rslora": rslora.pop(),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
        "bias": "none",
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of every adapted layer of ``model`` (:class:`QLoraLinear`,
    :class:`~qlora_kernels.hf.DenseLoraLinear`) in PEFT's format.

    ``out_dir`` gets ``adapter_model.safetensors`` (the adapters in their dtype) and ``adapter_config.json``
    (:func:`adapter_config`). PEFT applied to the unquantized base model with that directory computes what this
    model computes with its dequantized base. Biases are not saved (PEFT ``bias="none"``). Returns the directory.
    """
    from safetensors.torch import save_file

    config = adapter_config(model, base_model_name_or_path)
    tensors: dict[str, Tensor] = {}
    for name, m in _lora_layers(model).items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu").contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu").contiguous()
    for name in config["modules_to_save"] or ():
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{_PREFIX}{name}.{pname}"] = p.detach().to("cpu").contiguous()
    for name, m in model.named_modules():
        if isinstance(m, NF4Experts) and m.r > 0:
            for proj, prefix in moe.peft_keys(name, tuple(m.lora_A)).items():
                a, b = moe.to_peft(m.lora_A[proj].detach(), m.lora_B[proj].detach())
                tensors[f"{_PREFIX}{prefix}.lora_A.weight"] = a.to("cpu").contiguous()
                tensors[f"{_PREFIX}{prefix}.lora_B.weight"] = b.to("cpu").contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(path: Path) -> dict:
    """Read and type-check the adapter_config.json fields :func:`load_adapter` uses.

    Returns ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern``, with
    PEFT's defaults for absent keys (r 8, alpha 8, dropout 0.0, rslora false, no patterns). ``null`` reads as the
    default where PEFT writes it (``modules_to_save``, ``target_parameters``, the patterns, ...), but ``r``,
    ``lora_alpha`` and ``lora_dropout`` set numbers of the layer, and PEFT itself fails on a ``null`` there: a
    ``null`` one is an error (it would otherwise load silently with another scaling). Raises ValueError naming the
    file and the key for anything else: not JSON, not a JSON object, a value of the wrong type or range
    (``use_rslora: "false"`` is an error, not True), a pattern that is not a regex, or a feature this package does
    not support (DoRA, trained biases, another peft_type).
    """
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} must be UTF-8 JSON: {exc}") from None
    if not text.strip():
        raise ValueError(f"{where} is empty; it must hold a JSON object (PEFT's LoraConfig)")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must hold a JSON object (PEFT's LoraConfig); got a JSON {type(cfg).__name__}")

    def get(key: str, default):
        value = cfg.get(key)
        return default if value is None else value

    def bad(key: str, want: str):
        return ValueError(f"{where}: {key} must be {want}; got {cfg[key]!r}")

    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type must be 'LORA'; got {cfg.get('peft_type')!r}")
    for key in ("use_dora", "lora_bias"):
        if get(key, False) is not False:
            raise ValueError(f"{where}: {key} must be false (not supported); got {cfg[key]!r}")
    if get("bias", "none") != "none":
        raise ValueError(f"{where}: bias must be 'none' (trained biases are not supported); got {cfg['bias']!r}")
    to_save = get("modules_to_save", [])
    if not isinstance(to_save, list) or not all(isinstance(n, str) and n for n in to_save):
        raise bad("modules_to_save", "a list of module names")
    for key in ("r", "lora_alpha", "lora_dropout"):
        if key in cfg and cfg[key] is None:
            raise ValueError(f"{where}: {key} is null; it must be a number (PEFT's default when the key is absent "
                             f"is {dict(r=8, lora_alpha=8, lora_dropout=0.0)[key]}, but a null value is refused, "
                             f"as PEFT refuses it)")
    try:
        r, alpha, dropout = check_lora_args(get("r", 8), get("lora_alpha", 8), get("lora_dropout", 0.0))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    rslora = get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise bad("use_rslora", "true or false")
    patterns = {}
    for key, check, want in (("rank_pattern", is_lora_rank, "positive integers"),
                             ("alpha_pattern", is_lora_alpha, "finite numbers")):
        pattern = get(key, {})
        if not isinstance(pattern, dict):
            raise bad(key, f"an object mapping module-name regexes to {want}")
        for name, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?({name})$")
            except re.error as exc:
                raise ValueError(f"{where}: {key} key {name!r} is not a regex: {exc}") from None
            if not check(value):
                raise ValueError(f"{where}: {key}[{name!r}] must be one of {want}; got {value!r}")
        patterns[key] = pattern
    targets = get("target_parameters", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise bad("target_parameters", "a list of parameter names")
    base = cfg.get("base_model_name_or_path")
    return dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, target_parameters=targets,
                modules_to_save=to_save,
                base_model_name_or_path=base if isinstance(base, str) and base else None, **patterns)


class OtherBaseModelWarning(UserWarning):
    """An adapter whose ``adapter_config.json`` names another base model than the one it is loaded into (its
    shapes fit: a fine-tune of the same size, or a renamed copy; the tokens it gives may mean nothing)."""


def _same_model_name(a: str, b: str) -> bool:
    """Whether two model names or paths name one model: the same directory, or the same last component (a hub id
    ``org/name`` and a local copy ``/models/name``)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return pa.name.lower() == pb.name.lower()


def _warn_other_base(model: nn.Module, cfg: dict, in_dir: Path) -> None:
    want = cfg.get("base_model_name_or_path")
    config = getattr(model, "config", None)
    have = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if want and have and not _same_model_name(str(want), str(have)):
        import warnings

        warnings.warn(f"adapter in {str(in_dir)!r} was trained on {want!r} (its adapter_config.json's "
                      f"base_model_name_or_path) and is loaded into {str(have)!r}: its shapes fit, but on another "
                      "base model its outputs may mean nothing", OtherBaseModelWarning, stacklevel=3)


def _read_adapter(in_dir: Path) -> tuple[dict, dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """``(config, {layer: (lora_A, lora_B)}, {module.parameter: tensor of a module saved whole})`` of an adapter
    directory, checked."""
    from safetensors.torch import load_file

    cfg_path, w_path = in_dir / CONFIG_NAME, in_dir / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"in_dir must hold {CONFIG_NAME}; {str(in_dir)!r} does not")
    if not w_path.is_file():
        hint = " (adapter_model.bin is not read: safetensors only)" if (in_dir / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"in_dir must hold {WEIGHTS_NAME}; {str(in_dir)!r} does not{hint}")
    cfg = _read_config(cfg_path)
    pairs: dict[str, dict[str, Tensor]] = {}
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{w_path} is not a readable safetensors file: {exc}") from None
    whole: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{w_path}: {key} must be float32, float16 or bfloat16; got {t.dtype}")
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m is not None:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        name = key.removeprefix(_PREFIX)
        if not any(name.startswith(f"{s}.") or f".{s}." in f".{name}" for s in cfg["modules_to_save"]):
            raise ValueError(f"{WEIGHTS_NAME}: unexpected key {key!r} (lora_A / lora_B weights, and the parameters of "
                             f"the modules_to_save {cfg['modules_to_save']} are supported)")
        whole[name] = t
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{WEIGHTS_NAME}: module {name!r} has {sorted(ab)} but needs both lora_A and lora_B")
        out[name] = (ab["lora_A"], ab["lora_B"])
    if not out:
        raise ValueError(f"{WEIGHTS_NAME} holds no LoRA weights")
    return cfg, out, whole


def load_adapter(model: nn.Module, in_dir: str | Path, is_trainable: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, in place.

    Layers named in the file that already have adapters (:class:`QLoraLinear`, :class:`~qlora_kernels.hf.
    DenseLoraLinear`) get the file's weights (and its alpha / scaling); layers that are still plain (``nn.Linear``,
    ``Conv1D``, 4-bit :class:`NF4Linear` or bitsandbytes ``Linear4bit``) get adapters of the file's rank as
    :func:`~qlora_kernels.apply_qlora` puts them (full-precision layers quantized to NF4 first, but for the dense
    layers of a 4-bit model, which get plain LoRA; on a transformers bitsandbytes model the same state handling).
    The parameters of modules saved whole (the file's ``modules_to_save``, e.g. a reward model's ``score`` head) are
    copied into the model's modules of the same names, which then count as its ``modules_to_save``. Everything but
    the adapters (and those modules) is frozen; ``is_trainable=False`` freezes those too.

    Warns:
        OtherBaseModelWarning: the file's ``base_model_name_or_path`` names another model than ``model``'s
        ``name_or_path`` (neither the same directory nor the same last path component), while the shapes fit.

    Raises:
        ValueError naming the module, the expected and the actual shape when the file does not fit the model
        (another architecture or size), or when the model has adapters on layers the file does not cover.
    """
    in_dir = Path(in_dir)
    cfg, weights, whole = _read_adapter(in_dir)
    _warn_other_base(model, cfg, in_dir)
    whole_plan = _whole_modules_plan(model, whole, in_dir)
    expert_plan = _experts_plan(model, cfg, weights, in_dir)  # takes the experts' tensors out of weights
    modules = {name: (m, kind) for name, m, kind in linear_modules(model)}
    absent = [n for n in weights if n not in modules]
    if absent:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_layer_names(model)})
        raise ValueError(f"adapter in {str(in_dir)!r} is for another model: it has weights for {absent[:4]}, which "
                         f"{type(model).__name__} lacks (its linear layers are named {leaves})")
    extra = sorted(set(_lora_layers(model)) - set(weights))
    if extra:
        raise ValueError(f"model has LoRA adapters on {extra[:4]} which the adapter in {str(in_dir)!r} does not cover")
    base_r, base_alpha, dropout, rslora = cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]
    plan = []  # check everything before changing the model
    for name, (a, b) in weights.items():
        module, kind = modules[name]
        r = _pattern_value(cfg["rank_pattern"], name, base_r)
        alpha = _pattern_value(cfg["alpha_pattern"], name, base_alpha)
        if kind == "conv1d":
            in_f, out_f = module.weight.shape
        else:
            out_f, in_f = module.out_features, module.in_features
        want_a, want_b = (r, in_f), (out_f, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"adapter in {str(in_dir)!r} does not fit {type(model).__name__} (an adapter for another "
                             f"base model or size?): {name}: lora_A must be {list(want_a)} and lora_B "
                             f"{list(want_b)} (r={r}, in={in_f}, out={out_f}); got {list(a.shape)} and "
                             f"{list(b.shape)}")
        if isinstance(module, LORA_TYPES) and module.r != r:
            raise ValueError(f"adapter {name}: the layer has r={module.r}; the file has r={r}")
        if kind == "other-linear":
            raise TypeError(f"adapter {name}: the layer is a {type(module).__module__}.{type(module).__name__}, which "
                            f"load_adapter cannot convert (supported: nn.Linear, Conv1D, Linear4bit nf4, NF4Linear)")
        plan.append((name, module, kind, a, b, r, alpha))
    bnb4 = adopt_bnb4_layout(model)
    for name, module, kind, a, b, r, alpha in plan:
        if not isinstance(module, LORA_TYPES):
            module = make_lora(module, kind, name, r=r, lora_alpha=alpha, lora_dropout=dropout,
                               use_rslora=rslora, blocksize=64, double_quant=True, lora_dtype=torch.float32)
            replace_module(model, name, module)
        with torch.no_grad():
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
        module.lora_alpha, module.lora_dropout, module.use_rslora = alpha, dropout, rslora
        module.scaling = lora_scaling(r, alpha, rslora)
    if expert_plan:
        moe.quantize_experts(model)
    for name, projections, factors in expert_plan:
        module = model.get_submodule(name)
        if module.r != cfg["r"] or tuple(module.lora_A) != projections:
            module.add_lora(cfg["r"], cfg["lora_alpha"], dropout, rslora, torch.float32, projections)
        with torch.no_grad():
            for proj, (a, b) in factors.items():
                module.lora_A[proj].copy_(a)
                module.lora_B[proj].copy_(b)
        module.lora_alpha, module.use_rslora = cfg["lora_alpha"], rslora
        module.scaling = lora_scaling(cfg["r"], cfg["lora_alpha"], rslora)
    if bnb4:
        drop_bnb4_state(model)
    with torch.no_grad():
        for param, value in whole_plan:
            param.copy_(value)
    if whole_plan:
        names = {k.rsplit(".", 1)[0] for k in whole}
        model.qlora_modules_to_save = tuple(dict.fromkeys((*getattr(model, "qlora_modules_to_save", ()),
                                                           *sorted(names))))
    freeze_all_but_lora(model, trainable=is_trainable)
    return model


def _whole_modules_plan(model: nn.Module, whole: dict[str, Tensor], in_dir: Path) -> list[tuple[Tensor, Tensor]]:
    """``(model parameter, file tensor)`` for each parameter of a module saved whole, checked to exist and fit."""
    params = dict(model.named_parameters())
    plan = []
    for name, value in whole.items():
        p = params.get(name)
        if p is None:
            raise ValueError(f"adapter in {str(in_dir)!r} saves {name!r} whole (modules_to_save), which "
                             f"{type(model).__name__} lacks (a reward model's score head loads into a model built "
                             f"with AutoModelForSequenceClassification)")
        if tuple(p.shape) != tuple(value.shape):
            raise ValueError(f"adapter in {str(in_dir)!r} does not fit {type(model).__name__}: {name} must be "
                             f"{list(p.shape)}; got {list(value.shape)}")
        plan.append((p, value))
    return plan


def _experts_plan(model: nn.Module, cfg: dict, weights: dict, in_dir: Path) -> list:
    """The experts LoRA of an adapter file (PEFT's ``target_parameters``): for each targeted experts module, its
    projections and our factors, checked against the module's shapes. Their tensors leave ``weights``."""
    if not cfg["target_parameters"]:
        return []
    plan = []
    for name, projections in moe.targeted(model, cfg["target_parameters"]).items():
        module = model.get_submodule(name)
        factors = {}
        for proj, prefix in moe.peft_keys(name, projections).items():
            if prefix not in weights:
                raise ValueError(f"adapter in {str(in_dir)!r}: target_parameters names {name}.{proj}, but the file "
                                 f"has no {prefix}.lora_A / lora_B")
            a, b = weights.pop(prefix)
            shape = (module.qweight(proj).shape if isinstance(module, NF4Experts) else getattr(module, proj).shape)
            e, out_f, in_f = shape
            r = cfg["r"]
            if tuple(a.shape) != (r * e, in_f) or tuple(b.shape) != (out_f, r * e):
                raise ValueError(f"adapter {name}.{proj}: lora_A must be {[r * e, in_f]} and lora_B {[out_f, r * e]} "
                                 f"(r={r}, {e} experts); got {list(a.shape)} and {list(b.shape)}")
            factors[proj] = moe.from_peft(a, b, e)
        plan.append((name, projections, factors))
    return plan
