"""The schema of a run's non-algorithm settings: every trainer.*, data.*, eval.*, lora.* and top-level key's type and
valid range (docs/design.md, "Layers": validation happens before anything loads).

The algorithm hyperparameters (``algo.*``) have their own schema, posttrain.algorithms.hparams.validate (it imports
torch, so it is called lazily: :func:`check_algo`). Both raise one-line errors naming the key and what is valid.

Used on the composed config by run.py (before any model, data or tokenizer loads) and on the command line's
override values by posttrain.sweep.checks (the launch's and the dry run's check of every cell, without composing).
Torch-free.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

PRECISIONS = ("fp32", "bf16-mixed", "bf16-pure")  # posttrain.models.precision.PRECISIONS (that module imports torch)
_PATH_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A setting that cannot run: one line naming the key and what is valid."""


@dataclass(frozen=True)
class Spec:
    """One key's type (int, float, bool, auto_bool, str, choice, str_list, shots, limit) and range."""

    kind: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False       # lo < value instead of lo <= value
    hi_open: bool = False
    nullable: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "choice":
            what = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "str_list":
            what = "a list of strings, e.g. [a,b]"
        elif self.kind == "shots":
            what = "an integer >= 0 or a {task: integer >= 0} mapping"
        elif self.kind == "auto_bool":
            what = "auto, true or false"
        else:
            what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                    "limit": "a number of documents (integer >= 1, or a fraction in (0, 1))"}[self.kind]
            bounds = []
            if self.lo is not None:
                bounds.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
            if self.hi is not None:
                bounds.append(f"{'<' if self.hi_open else '<='} {_num(self.hi)}")
            if bounds:
                what += " " + " and ".join(bounds)
        return what + (" or null" if self.nullable else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "auto_bool":
            return isinstance(value, bool) or value == "auto"
        if self.kind == "str":
            return isinstance(value, str)
        if self.kind == "choice":
            return value in self.choices and not isinstance(value, bool)
        if self.kind == "str_list":
            return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        if self.kind == "shots":
            if isinstance(value, Mapping):
                return all(_int(v) and v >= 0 for v in value.values())
            return _int(value) and value >= 0
        if self.kind == "limit":
            # lm-eval: a limit under 1 is a fraction of the documents, from 1 on a count (int(limit))
            return (_number(value) and value >= 1 and float(value).is_integer()) or (
                isinstance(value, float) and 0 < value < 1)
        if self.kind == "int" and not _int(value):
            return False
        if self.kind == "float" and not (_number(value) and math.isfinite(float(value))):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str) if isinstance(value, (list, dict, tuple)) else str(value)


INT1 = Spec("int", lo=1)
INT0 = Spec("int", lo=0)
BOOL = Spec("bool")
POSITIVE = Spec("float", lo=0, lo_open=True)
FRACTION = Spec("float", lo=0, hi=1)
AUTO_BOOL = Spec("auto_bool")  # auto | true | false

#: dotted key -> Spec, for every key a run reads outside algo.* and scale.* (scale files are the study's own
#: settings; their values reach trainer/data/eval through interpolations and are checked there).
SCHEMA: dict[str, Spec] = {
    # top level (conf/config.yaml)
    "seed": INT0,
    "dry_run": BOOL,
    "sweep_name": Spec("str"),
    "output_root": Spec("str"),
    "trust_remote_code": BOOL,
    "mirror": Spec("str", nullable=True),
    "keep_checkpoints": BOOL,
    "save_model": Spec("bool", nullable=True),
    # trainer (conf/trainer/default.yaml)
    "trainer.lr": POSITIVE,
    "trainer.epochs": INT1,
    "trainer.micro_batch_size": INT1,
    "trainer.grad_accum": INT1,
    "trainer.max_steps": Spec("int", lo=1, nullable=True),
    "trainer.warmup_ratio": Spec("float", lo=0, hi=1, hi_open=True),
    "trainer.schedule": Spec("choice", choices=("cosine", "constant")),
    "trainer.eps": POSITIVE,
    "trainer.weight_decay": Spec("float", lo=0),
    "trainer.max_grad_norm": Spec("float", lo=0, lo_open=True, nullable=True),
    "trainer.precision": Spec("choice", choices=PRECISIONS),
    "trainer.checkpoint_every": INT0,
    "trainer.checkpoint_minutes": Spec("float", lo=0, lo_open=True, nullable=True),
    "trainer.log_every": INT1,
    "trainer.threads": Spec("int", lo=1, nullable=True),
    "trainer.reference_cache": Spec("bool"),
    "trainer.group_by_length": Spec("bool"),
    "trainer.gradient_checkpointing": AUTO_BOOL,  # posttrain/models/memory_plan.py
    "trainer.liger": AUTO_BOOL,  # posttrain/models/kernels.py
    "trainer.shared_prompt": AUTO_BOOL,  # posttrain/models/shared_prompt.py
    # data (conf/data/selfplay.yaml)
    "data.source": Spec("choice", choices=("synthetic", "gsm8k")),
    "data.path": Spec("str", nullable=True),
    "data.num_prompts": Spec("int", lo=1, nullable=True),  # null: every training problem
    "data.prompt_format": Spec("choice", choices=("raw", "fewshot")),
    "data.fewshot": INT0,
    "data.stop_strings": Spec("str_list", nullable=True),
    "data.samples_per_prompt": Spec("int", lo=2),
    "data.temperature": POSITIVE,
    "data.top_p": Spec("float", lo=0, lo_open=True, hi=1),
    "data.max_new_tokens": INT1,
    "data.max_length": INT1,
    "data.sft_source": Spec("choice", choices=("chosen", "all_correct")),
    "data.generation_batch_size": INT1,
    "data.generation_backend": Spec("choice", choices=("hf", "vllm")),  # posttrain/rollout/vllm_backend.py
    "data.min_pair_yield": FRACTION,
    "data.seed": INT0,
    "data.mirror": Spec("str", nullable=True),
    # eval (conf/eval/default.yaml)
    "eval.tasks": Spec("str_list"),
    "eval.num_fewshot": Spec("shots"),
    "eval.apply_chat_template": BOOL,
    "eval.limit": Spec("limit", nullable=True),
    "eval.batch_size": INT1,
    "eval.max_gen_toks": INT1,
    "eval.base_scores": BOOL,
    "eval.backend": Spec("choice", choices=("hf", "vllm")),
    # lora (conf/lora/on.yaml)
    "lora.enabled": BOOL,
    "lora.r": INT1,
    "lora.alpha": POSITIVE,
    "lora.dropout": Spec("float", lo=0, hi=1, hi_open=True),
}


def check_value(key: str, value: Any, shown: Optional[str] = None) -> None:
    """Raise ConfigError when ``value`` is not valid for ``key`` (keys outside the schema pass)."""
    if key == "trainer.betas" and not _betas(value):
        raise ConfigError(f"trainer.betas={shown or _show(value)}: must be two numbers in [0, 1), e.g. [0.9,0.95]")
    spec = SCHEMA.get(key)
    if spec is None or spec.ok(value):
        return
    raise ConfigError(f"{key}={shown if shown is not None else _show(value)}: must be {spec.describe()}")


def _betas(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(b) and 0 <= b < 1 for b in value)


def check_config(config: Mapping[str, Any]) -> None:
    """Check a resolved config (plain dict) against SCHEMA and the few rules across keys; raise ConfigError."""
    for key, spec in SCHEMA.items():
        group, _, leaf = key.rpartition(".")
        node = config.get(group) if group else config
        if isinstance(node, Mapping) and leaf in node:
            check_value(key, node[leaf])
    if "betas" in (config.get("trainer") or {}):
        check_value("trainer.betas", config["trainer"]["betas"])
    evaluation = config.get("eval") or {}
    profiles = evaluation.get("profiles")
    if isinstance(profiles, Mapping) and evaluation.get("profile") not in profiles:
        raise ConfigError(f"eval.profile={_show(evaluation.get('profile'))}: must be one of {', '.join(profiles)}")


_VALIDATED: dict[str, Optional[str]] = {}


def check_algo(name: str, hparams: Mapping[str, Any]) -> None:
    """posttrain.algorithms.hparams.validate, once per distinct (algorithm, hyperparameters) in this process; its
    ValueError becomes a ConfigError (one line). Imports torch on the first call."""
    key = json.dumps([name, hparams], sort_keys=True, default=str)
    if key not in _VALIDATED:
        from posttrain.algorithms.hparams import validate

        try:
            validate(name, dict(hparams))
            _VALIDATED[key] = None
        except ValueError as exc:
            _VALIDATED[key] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _VALIDATED[key] is not None:
        raise ConfigError(_VALIDATED[key])


#: Keys that choose a generation backend (posttrain.rollout.vllm_backend).
BACKEND_KEYS = ("data.generation_backend", "eval.backend")


def check_backends(config: Mapping[str, Any]) -> None:
    """A backend key set to vllm where vllm is not importable or no CUDA GPU is visible: one ConfigError line saying
    what to install or to use hf (imports torch only then)."""
    for key in BACKEND_KEYS:
        group, _, leaf = key.partition(".")
        if (config.get(group) or {}).get(leaf) == "vllm":
            from posttrain.rollout.vllm_backend import unavailable

            line = unavailable(key)
            if line is not None:
                raise ConfigError(line)


def check_run_config(cfg: Any, *, algo_too: bool = True) -> None:
    """The composed config of one cell: SCHEMA, then (``algo_too``) the algorithm's hyperparameters."""
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # noqa: BLE001 - an interpolation that does not resolve: one line, its own message
        raise ConfigError(f"the config does not resolve: {str(exc).splitlines()[0]}") from None
    check_config(config)
    if not config.get("dry_run"):  # where the run runs (a dry run may list cells on a machine without the GPU)
        check_backends(config)
    if algo_too:
        hparams = dict(config.get("algo") or {})
        name = str(hparams.pop("name", ""))
        check_algo(name, hparams)
