"""Each stage's glue, over one ``Run``: what it reads, its stage key, the work, what it leaves for the next.

Every stage goes through ``Run.stage``: begin (skip when the finished folder's manifest matches), the
work inside ``guard`` (disk-full and permission errors become one clear error), the manifest written last
by the main process, and every process seeing it. ``distill.pipeline.run`` lists the stages in order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import building, write_json
from core.hashing import digest, flatten
from distill.config import ConfigError, RunConfig, key_settings, openvino_on, student_plan, student_sizes, to_dict
from distill.stages import Stage, Stages, guard

log = logging.getLogger("distill")
SPLITS = ("train", "validation", "test", "heldout")
EVAL_SPLITS = ("test", "heldout")  # scored and gated: in distribution, and unlike training
# TrainConfig knobs that do not change the trained weights: changing them does not redo distillation.
NOT_IN_RESULT = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_generate")


class timed:
    """Log one line when a step starts and one with its duration when it ends."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t = time.time()
        log.info("stage %s: start", self.name)

    def __exit__(self, *exc):
        log.info("stage %s: %s in %.1f s", self.name, "failed" if exc[0] else "done", time.time() - self.t)


class LazyTeacher:
    """The teacher model, loaded on first use: a rerun whose teacher-using stages are all finished
    never loads its weights."""

    def __init__(self, folder: Path, rc: RunConfig):
        self.folder, self.rc, self.model = folder, rc, None

    def get(self):
        if self.model is None:
            from families.hf import load_causal_lm

            with timed("load teacher"):
                self.model = load_causal_lm(
                    self.folder, self.rc.teacher.quantization, trust_remote_code=self.rc.teacher.trust_remote_code
                )
        return self.model

    def forget(self) -> None:
        self.model = None


@dataclass
class Run:
    """One run: its config, folder, process group and stage records, and what each stage left for the next."""

    rc: RunConfig
    dir: Path
    acc: Any  # accelerate.Accelerator
    stages: Stages
    started: float = field(default_factory=time.time)
    data_hash: str = ""
    records: dict[str, list[dict]] = field(default_factory=dict)
    teacher_dir: Path | None = None
    teacher_hash: str = ""  # content of the teacher folder
    teacher_id: str = ""  # what the teacher computes: its content and how it is loaded (8bit / nf4 change logits)
    teacher: LazyTeacher | None = None
    tokenizer: Any = None
    enc: dict[str, list[dict]] = field(default_factory=dict)
    plan: Any = None  # prune.Plan of student.init=prune, made once by the pipeline from the teacher's config
    plan_teacher: dict = field(default_factory=dict)  # the teacher numbers ``plan`` was made from
    signals: Any = None  # distill.signals.TopKSignals with distill.signals=topk
    student_hash: str = ""
    qad: dict[str, Stage] = field(default_factory=dict)  # scheme -> its finished quantization-aware student
    # extra training pools beside the task data, by name (augment, general): encoded examples, and the
    # output hash of the stage that made them (part of every later stage key that trains on them)
    mix: dict[str, list[dict]] = field(default_factory=dict)
    mix_hash: dict[str, str] = field(default_factory=dict)
    mix_info: dict[str, dict] = field(default_factory=dict)  # what each extra pool holds (metrics.json)
    general_sequences: list[list[int]] = field(default_factory=list)

    def train_data(self):
        """The distillation data: the task's training split, with each extra pool at its share of a batch."""
        from distill.train import Mixture

        shares = {"augment": self.rc.distill.augment.share, "general": self.rc.distill.general.share}
        return Mixture(self.enc["train"], [(self.mix[k], shares[k]) for k in sorted(self.mix)])

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def stage(
        self,
        name: str,
        folder: Path,
        config: dict,
        inputs: dict,
        work: Callable[[Stage], dict | None],
        *,
        on: str = "all",
    ) -> Stage:
        """Run (or skip) one stage. ``on``: ``all`` (every process works, e.g. training), ``main`` (the main
        process works, the others wait for its manifest), ``main-only`` (inside a section only the main
        process runs: no waiting). ``work(stage)`` may return a dict of extra manifest fields."""
        st = self.stages.begin(name, folder, config, inputs)
        if not st.skipped and (on == "all" or self.main):
            with guard(name, st.folder):
                extra = work(st)
                if self.main:
                    self.stages.finish(st, extra if isinstance(extra, dict) else None)
        if on != "main-only":
            self.acc.wait_for_everyone()
            self.stages.adopt(st)
        return st


# ---- data and teacher ----


def load_data(r: Run) -> None:
    from distill.data import DataError, data_hash, load_records

    with timed("data"):
        r.data_hash = data_hash(r.rc.data)
        r.records = {s: load_records(r.rc.data, s) for s in SPLITS}
        for s in ("train", "test"):
            if not r.records[s]:
                raise DataError(f"data: the {s} split is empty")
        log.info("data %s: %s", r.data_hash, ", ".join(f"{s}={len(r.records[s])}" for s in SPLITS))


def teacher(r: Run) -> None:
    """The task teacher: a user's folder (hashed) or GGUF file (converted once into a cached folder),
    optionally fine-tuned on the training data; or, without ``teacher.path``, the bootstrapped one. Then
    the tokenizer, the encoded splits, the teacher identity and the prune plan for its real config."""
    from transformers import AutoTokenizer

    from core.chat import check_template, ensure_pad
    from core.hashing import folder_hash
    from distill.data import encode_records
    from families.hf import read_config, vocab_problems

    rc = r.rc
    key = "teacher.path" if rc.teacher.path else "teacher"
    if rc.teacher.path:
        r.teacher_dir = source_teacher(r)
        if rc.teacher.finetune.enabled:  # a template problem is reported before the fine-tune, not after it
            base_tok = AutoTokenizer.from_pretrained(str(r.teacher_dir), trust_remote_code=rc.teacher.trust_remote_code)
            if problems := check_template(base_tok, key):
                raise ConfigError(problems)
            r.teacher_dir = finetuned_teacher(r, r.teacher_dir)
    else:
        r.teacher_dir = bootstrapped_teacher(r)
    t_cfg = read_config(r.teacher_dir)
    problems = []
    if rc.student.init == "folder":
        problems += vocab_problems(r.teacher_dir, rc.student.path, "student.path", rc.teacher.trust_remote_code)
    limit = t_cfg.get("max_position_embeddings")
    if limit and rc.data.max_length > limit:
        problems.append(f"data.max_length={rc.data.max_length} exceeds the teacher's max_position_embeddings={limit}")
    if problems:
        raise ConfigError(problems)
    r.tokenizer = AutoTokenizer.from_pretrained(str(r.teacher_dir), trust_remote_code=rc.teacher.trust_remote_code)
    problems = check_template(r.tokenizer, key)
    if problems:
        raise ConfigError(problems)
    pad = ensure_pad(r.tokenizer)
    if pad is not None:
        log.info("the tokenizer has no pad token: padding with %s (masked out of attention and every loss)", pad)
    r.enc = {s: encode_records(r.tokenizer, r.records[s], rc.data.max_length, f"data.{s}") for s in SPLITS}
    n_eval = rc.eval.num_test or None
    r.enc["test"], r.enc["heldout"] = r.enc["test"][:n_eval], r.enc["heldout"][:n_eval]
    r.teacher_hash = folder_hash(r.teacher_dir)
    r.stages.record["teacher"]["hash"] = r.teacher_hash
    q = rc.teacher.quantization
    r.teacher_id = r.teacher_hash if q == "none" else f"{r.teacher_hash}+{q}"
    r.teacher = LazyTeacher(r.teacher_dir, rc)
    if rc.student.init == "prune":
        # the plan the run started with (``pipeline.start``), unless the teacher's real numbers differ from
        # those it was made from (a bootstrapped teacher's trained tokenizer can be smaller than configured)
        if r.plan is None or any(t_cfg.get(k) != v for k, v in r.plan_teacher.items()):
            r.plan, r.plan_teacher = student_plan(rc, t_cfg), dict(t_cfg)
        for reason in r.plan.reasons:
            log.info("prune plan: %s", reason)


def _forced(r: Run, name: str) -> bool:
    return name in r.stages.force or "all" in r.stages.force


def source_teacher(r: Run) -> Path:
    """``teacher.path`` as a folder: itself; as a GGUF file: the cached folder it converts into (stage
    ``gguf``, keyed by the file's content)."""
    from distill.teacher import gguf_dir
    from families.gguf import convert_gguf, file_sha256, is_gguf

    tc = r.rc.teacher
    src = Path(tc.path)
    if not is_gguf(src):
        r.stages.record["teacher"] = {"status": "input", "folder": str(src)}
        return src
    sha = file_sha256(src)
    dest = gguf_dir(tc, sha)
    r.stage("gguf", dest, {}, {"gguf_sha256": sha}, lambda st: convert_gguf(src, dest), on="main")
    r.stages.record["teacher"] = {"status": "input", "folder": str(dest), "gguf": str(src)}
    return dest


def finetuned_teacher(r: Run, base: Path) -> Path:
    """``base`` fine-tuned on the run's training data (stage ``teacher``, cached by base, data, settings)."""
    import dataclasses as dc

    from core.hashing import folder_hash
    from distill.teacher import finetune_dir, finetune_teacher

    tc = r.rc.teacher
    base_hash = folder_hash(base)
    dest = finetune_dir(tc, r.data_hash, base_hash)

    def work(st: Stage) -> None:
        finetune_teacher(
            tc,
            base,
            base_hash,
            r.records,
            r.data_hash,
            r.rc.eval,
            accelerator=r.acc,
            max_length=r.rc.data.max_length,
            force=_forced(r, "teacher"),
        )

    inputs = {"data_hash": r.data_hash, "base_hash": base_hash}
    r.stage("teacher", dest, key_settings(dc.asdict(tc.finetune)), inputs, work)
    return dest


def bootstrapped_teacher(r: Run) -> Path:
    """The teacher trained from scratch on the task (stage ``teacher``, cached by settings and data)."""
    from distill.teacher import bootstrap_dir, bootstrap_teacher

    rc = r.rc
    dest = bootstrap_dir(rc.teacher, r.data_hash)

    def work(st: Stage) -> None:
        bootstrap_teacher(
            rc.teacher,
            r.records,
            r.data_hash,
            rc.eval,
            accelerator=r.acc,
            max_length=rc.data.max_length,
            force=_forced(r, "teacher"),
            avoid=heldout_avoid(r) if rc.teacher.bootstrap.random_values else frozenset(),
        )

    r.stage("teacher", dest, key_settings(dataclasses.asdict(rc.teacher.bootstrap)), {"data_hash": r.data_hash}, work)
    return dest


# ---- extra training pools: teacher-labelled augmented requests, general text (cached per teacher) ----


def augment(r: Run) -> None:
    """``distill.augment``: training requests with random open values, kept where the teacher answers them
    consistently or all with their implied calls (``distill.augment.keep``); cached per (teacher, data,
    settings) under the cache folder."""
    a = r.rc.distill.augment
    if not a.examples:
        return
    from distill.augment import candidates, implied, label
    from distill.data import encode_records, read_jsonl
    from distill.teacher import cache_root

    avoid = heldout_avoid(r)
    settings = {k: v for k, v in dataclasses.asdict(a).items() if k != "share"}
    key = {
        "teacher": r.teacher_id,
        "data": r.data_hash,
        "max_length": r.rc.data.max_length,
        "avoid": digest(sorted(avoid)),
    }
    folder = cache_root(r.rc.teacher) / "augment" / digest({**key, **settings})

    def work(st: Stage) -> dict:
        cands = candidates(r.records["train"], a.examples, a.seed, avoid, a.cross_script)
        if a.keep == "implied":
            kept, stats = implied(cands, r.tokenizer, max_length=r.rc.data.max_length)
        else:
            kept, stats = label(
                r.teacher.get(), r.tokenizer, cands, max_length=r.rc.data.max_length, batch_size=a.batch_size
            )
        with building(folder) as tmp:
            (tmp / "records.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in kept))
            write_json(tmp / "stats.json", stats)
        return {"kept": stats["kept"], "rejected": stats["rejected"]}

    st = r.stage("augment", folder, settings, key, work, on="main")
    kept = read_jsonl(folder / "records.jsonl", key="augment") if (folder / "records.jsonl").stat().st_size else []
    if not kept:
        log.warning(
            "augment: the teacher answered none of the %d new requests consistently (%s): it does not copy new "
            "values either, so there is nothing to distil from them; the run goes on without them",
            a.examples,
            folder / "stats.json",
        )
    r.mix["augment"] = encode_records(r.tokenizer, kept, r.rc.data.max_length, "augment")
    r.mix_hash["augment"] = st.output_hash
    stats = json.loads((folder / "stats.json").read_text())
    r.mix_info["augment"] = {
        **{k: stats[k] for k in ("candidates", "kept", "rejected", "too_long")},
        "share": a.share,
        "keep": a.keep,
        "folder": str(folder),
    }
    log.info("augment: %d new requests (keep=%s) at %.0f%% of every batch", len(kept), a.keep, 100 * a.share)


def heldout_avoid(r: Run) -> frozenset[str]:
    """Words and characters random values must not contain: those of the held-out values, so that no
    augmented request can carry one (the heldout split stays unseen)."""
    if r.rc.data.source == "car_assistant":
        from distill.data.car_assistant import heldout_vocabulary

        return heldout_vocabulary()
    from distill.data.augment import heldout_units

    return heldout_units(r.records["heldout"])


def general(r: Run) -> None:
    """``distill.general``: general-text sequences, the teacher's own samples from random first tokens
    (data-free) or a user's corpus, cached per (teacher, settings)."""
    g = r.rc.distill.general
    if not g.examples:
        return
    from core.hashing import sha256_file
    from distill.general import as_examples, sample_general
    from distill.teacher import cache_root

    settings = {k: v for k, v in dataclasses.asdict(g).items() if k not in ("share", "file")}
    key = {
        "teacher": r.teacher_id,
        "tokens": len(r.tokenizer),
        **({"file": sha256_file(Path(g.file))} if g.file else {}),
    }
    folder = cache_root(r.rc.teacher) / "general" / digest({**key, **settings})

    def work(st: Stage) -> dict:
        if g.file:
            seqs = corpus_sequences(g.file, r.tokenizer, g.examples, g.length)
        else:
            seqs = sample_general(
                r.teacher.get(), r.tokenizer, g.examples, g.length, g.temperature, g.seed, g.batch_size
            )
        with building(folder) as tmp:
            write_json(tmp / "sequences.json", seqs)
        return {"sequences": len(seqs)}

    st = r.stage("general", folder, settings, key, work, on="main")
    r.general_sequences = json.loads((folder / "sequences.json").read_text())
    r.mix["general"] = as_examples(r.general_sequences)
    r.mix_hash["general"] = st.output_hash
    r.mix_info["general"] = {"sequences": len(r.general_sequences), "length": g.length, "share": g.share}
    log.info(
        "general text: %d sequences of %d tokens at %.0f%% of every batch",
        len(r.general_sequences),
        g.length,
        100 * g.share,
    )


def corpus_sequences(path: str, tokenizer, n: int, length: int) -> list[list[int]]:
    """The first ``n`` ``length``-token windows of a JSONL corpus (``{"text": ...}`` per line)."""
    from distill.data import DataError

    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f'distill.general.file: {path}:{lineno}: expected {{"text": ...}} ({err})') from err
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= n * length:
                break
    seqs = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:n]
    if not seqs:
        raise DataError(f"distill.general.file: {path} holds fewer than {length} tokens of text")
    return seqs


# ---- cached teacher signals (distill.signals=topk), shared by every run on this teacher and data ----


def signals(r: Run) -> None:
    from distill.signals import TopKSignals, compute_topk, save_signals, signals_key
    from distill.teacher import cache_root

    d, tok = r.rc.distill, r.tokenizer
    data = list(r.train_data())  # the task data and the extra pools, in the order train() indexes them
    key = signals_key(r.teacher_id, r.data_hash, r.rc.data.max_length, d.topk, d.temperature, len(tok))
    if r.mix_hash:
        key["mix"] = dict(r.mix_hash)
    folder = cache_root(r.rc.teacher) / "signals" / digest(key)

    def compute(st: Stage) -> dict:
        tensors = compute_topk(r.teacher.get(), data, tok.pad_token_id, len(tok), d.topk, d.temperature, d.chunk_size)
        with building(folder) as tmp:
            save_signals(tensors, tmp, key)
        return {"tokens": int(tensors["offsets"][-1]), "examples": len(data)}

    st = r.stage("signals", folder, {"k": d.topk, "temperature": d.temperature}, key, compute, on="main")
    r.signals = TopKSignals(folder)
    r.signals.key = st.output_hash
    if len(r.signals) != len(data):
        raise RuntimeError(f"{folder}: cached signals cover {len(r.signals)} examples, the data has {len(data)}")
    log.info("teacher signals: top-%d of %d tokens from %s", r.signals.k, r.signals.tokens, folder)


# ---- prune (student.init=prune) ----


def prune(r: Run) -> Stage:
    """Prune the teacher to the plan (importance from training examples) into ``DIR/pruned/``, a plain HF
    folder that distillation starts from."""
    rc = r.rc
    p = rc.student.prune

    def work(st: Stage) -> None:
        from families.hf import load_causal_lm, save_model_atomically
        from prune import prune_model
        from prune.calibration import calibration_batches, sequence_batches

        model = r.teacher.get()
        source = model if rc.teacher.quantization == "none" else load_causal_lm(r.teacher_dir)  # full precision
        batches = calibration_batches(r.tokenizer, r.records["train"], p.calib_examples, max_length=rc.data.max_length)
        batches += sequence_batches(r.tokenizer.pad_token_id, r.general_sequences[: p.calib_general])
        pruned, report = prune_model(
            source, batches if p.method == "activation" else None, method=p.method, plan=r.plan
        )
        if r.main:
            save_model_atomically(pruned, r.tokenizer, st.folder, {"prune_report.json": report})
        r.acc.wait_for_everyone()

    return r.stage(
        "prune",
        r.dir / "pruned",
        {"prune": dataclasses.asdict(p), "sizes": student_sizes(rc)},
        {
            "teacher_hash": r.teacher_hash,
            "data_hash": r.data_hash,
            "max_length": rc.data.max_length,
            **({"general": r.mix_hash["general"]} if p.calib_general else {}),
        },
        work,
    )


# ---- distill ----


def distill(r: Run, init_input: dict) -> None:
    rc = r.rc
    dcfg = key_settings(dataclasses.asdict(rc.distill))
    for k in NOT_IN_RESULT:
        dcfg["train"].pop(k, None)  # (eval_generate at 0 is gone already: key_settings drops neutral knobs)
    config = {
        "student": {k: v for k, v in dataclasses.asdict(rc.student).items() if k != "prune"},
        "distill": dcfg,
        "max_length": rc.data.max_length,
        "processes": r.acc.num_processes,
    }
    inputs = {
        "teacher_hash": r.teacher_id,
        "data_hash": r.data_hash,
        **init_input,
        **({"signals": r.signals.key} if r.signals else {}),
        **{f"{k}_hash": v for k, v in r.mix_hash.items()},
    }

    def work(st: Stage) -> None:
        _train_student(r, st)

    st = r.stage("distill", r.dir / "student", config, inputs, work)
    if r.main and not st.skipped:
        shutil.rmtree(r.dir / "checkpoints", ignore_errors=True)  # only needed to resume
    r.student_hash = st.output_hash


def _train_student(r: Run, st: Stage) -> None:
    from transformers import AutoConfig

    from core.chat import stop_ids
    from distill.train import apply_lora, final_model, make_mode, train
    from families.hf import build_from_config, config_param_count, load_causal_lm, save_model_atomically, student_config

    rc, tok = r.rc, r.tokenizer
    s = rc.student
    if s.init == "folder":
        student = load_causal_lm(s.path)
    elif s.init == "prune":
        student = load_causal_lm(r.dir / "pruned")
    else:
        from families.hf import read_config

        student = build_from_config(student_config(read_config(r.teacher_dir), student_sizes(rc)), s.seed)
    student.generation_config.pad_token_id = tok.pad_token_id
    stops = stop_ids(tok)  # the template's end-of-turn token first: what the student learned to end with
    student.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    live = r.signals is None or rc.distill.features.weight > 0 or rc.distill.on_policy.fraction > 0
    t_model = r.teacher.get() if live else None
    if t_model is not None:
        for pair in rc.distill.features.layer_map:
            n_s, n_t = student.config.num_hidden_layers, t_model.config.num_hidden_layers
            if rc.distill.features.weight > 0 and (pair[0] >= n_s or pair[1] >= n_t):
                raise ConfigError(
                    [f"distill.features.layer_map: {pair} is out of range (student {n_s}, teacher {n_t} layers)"]
                )
    trainable = apply_lora(student, s.lora) if s.lora.enabled else student
    teacher_val = teacher_held = None
    tc = rc.distill.train
    if tc.eval_generate and tc.eval_every and r.enc["validation"]:
        from distill.train import generated_exact_match

        # the teacher on the same validation (and heldout) examples: the reference of the retention curves
        teacher_val = generated_exact_match(r.teacher.get(), tok, r.enc["validation"], tc)
        log.info("teacher exact match on the %d probed validation examples: %.3f", tc.eval_generate, teacher_val)
        if r.enc["heldout"]:
            teacher_held = generated_exact_match(r.teacher.get(), tok, r.enc["heldout"], tc)
            log.info("teacher exact match on the %d probed heldout examples: %.3f", tc.eval_generate, teacher_held)
    n_teacher = config_param_count(AutoConfig.from_pretrained(str(r.teacher_dir)))
    n_student = config_param_count(student.config)
    log.info("teacher %d params, student %d params (%.3fx)", n_teacher, n_student, n_student / n_teacher)
    if rc.trackers:
        # "tensorboard" names the folder under the run folder (and MLflow's experiment); the run is rc.name
        r.acc.init_trackers("tensorboard", config=_flat(to_dict(rc)), init_kwargs={"mlflow": {"run_name": rc.name}})
    result = train(
        trainable,
        tok,
        r.train_data(),
        rc.distill.train,
        accelerator=r.acc,
        mode=make_mode(rc.distill, teacher=t_model, signals=None if live else r.signals),
        checkpoint_dir=r.dir / "checkpoints",
        checkpoint_key=st.key,
        val_data=r.enc["validation"] or None,
        heldout_data=r.enc["heldout"] or None,
        desc="distill",
        log_prefix="distill/",
    )
    student = final_model(r.acc, trainable, result)  # gathered to the main process when sharded
    if result.sharded:
        r.teacher.forget()  # its weights were sharded in place; a later stage reloads it whole
    if r.main:
        info = {
            "teacher": str(r.teacher_dir),
            "teacher_hash": r.teacher_hash,
            "data_hash": r.data_hash,
            "steps": rc.distill.train.steps,
            "signals": rc.distill.signals,
            "seconds": result.seconds,
            "skipped_steps": result.skipped_steps,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
            "final_loss": result.history[-1]["loss"] if result.history else None,
            "teacher_val_exact_match": teacher_val,
            "teacher_heldout_exact_match": teacher_held,
            "history": result.history,
        }
        save_model_atomically(student, tok, st.folder, {"distill_info.json": info})
    r.acc.wait_for_everyone()


def _flat(d: dict) -> dict:
    """Nested config -> flat scalar dict for trackers (lists and None as JSON)."""
    return {k: v if isinstance(v, int | float | str | bool) else json.dumps(v) for k, v in flatten(d).items()}


# ---- evaluate (main process only from here on) ----


def _ev(rc: RunConfig) -> dict:
    from distill.evaluate import eval_settings

    return eval_settings(rc.eval)


def _teacher_own_eval(r: Run, split: str):
    """(scores, answers) the teacher stage measured on exactly these ``split`` examples with these eval
    settings (a bootstrapped or fine-tuned teacher's folder carries its test evaluation), or None."""
    from safetensors.torch import load_file

    from distill.evaluate import OWN_EVAL, OWN_TOPK, TopK, split_key

    own = r.teacher_dir / OWN_EVAL
    if split != "test" or r.teacher_id != r.teacher_hash or not own.is_file():
        return None  # measured on the float weights: a teacher loaded in 8bit / nf4 is evaluated again
    saved = json.loads(own.read_text())
    if saved.get("key") != split_key(r.enc[split], r.rc.eval):
        return None
    scores = dict(saved["scores"])
    if r.rc.eval.kl_topk:
        scores["signals"] = TopK(**load_file(str(r.teacher_dir / OWN_TOPK)))
    log.info("teacher %s answers: measured by the teacher stage (%s)", split, own)
    return scores, saved["answers"]


def teacher_answers(r: Run) -> dict:
    """The teacher's test / heldout scores and greedy answers, and with ``eval.kl_topk`` its top-k log-probs
    at every answer position (``TopK``, under ``signals``), cached per (teacher, data, eval settings):
    every student of a sweep, and every ONNX variant, is compared with them without another teacher pass."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from distill.evaluate import TopK, evaluate_model
    from distill.teacher import cache_root
    from families.hf import config_param_count

    ev, enc, k = _ev(r.rc), r.enc, r.rc.eval.kl_topk
    key = {
        "teacher_hash": r.teacher_id,
        "data_hash": r.data_hash,
        "eval": ev,
        "n": [len(enc["test"]), len(enc["heldout"])],
        **({"kl_topk": k} if k else {}),  # absent when off: caches made before the knob stay valid
    }
    folder = cache_root(r.rc.teacher) / "teacher_eval" / digest(key)
    path = folder / "scores.json"
    splits = [s for s in EVAL_SPLITS if enc[s]]
    if path.is_file():
        log.info("teacher test answers: reusing %s", folder)
        out = json.loads(path.read_text())
        if k:
            out["signals"] = {s: TopK(**load_file(str(folder / f"topk_{s}.safetensors"))) for s in splits}
        return out
    res = {
        s: _teacher_own_eval(r, s) or evaluate_model(r.teacher.get(), r.tokenizer, enc[s], keep_topk=k, **ev)
        for s in splits
    }
    signals = {s: res[s][0].pop("signals", None) for s in splits}
    t_test, t_ans = res["test"]
    t_held, t_held_ans = res.get("heldout", ({}, None))
    out = {
        "key": key,
        "test": {
            **t_test,
            "num_params": config_param_count(
                AutoConfig.from_pretrained(str(r.teacher_dir), trust_remote_code=r.rc.teacher.trust_remote_code)
            ),
            "heldout": t_held,
        },
        "answers": t_ans,
        "heldout_answers": t_held_ans,
    }
    with guard("evaluate", folder):
        with building(folder) as tmp:
            write_json(tmp / "scores.json", out)
            for s in splits if k else ():
                save_file(signals[s].tensors(), str(tmp / f"topk_{s}.safetensors"))
    return {**out, "signals": signals} if k else out


def teacher_reference(r: Run, t: dict, split: str):
    """What a model is compared with on ``split``: the teacher's cached ``TopK`` signals (``eval.kl_topk``)
    or, with ``eval.kl_topk: 0``, the teacher model itself (exact KL, one teacher pass per model)."""
    return t["signals"][split] if r.rc.eval.kl_topk else r.teacher.get()


def evaluate(r: Run) -> dict:
    """Teacher and student scores on test / heldout (and PyTorch bytes and latency when exporting); the
    student's misses beside the teacher's answers in ``misses.json``."""
    e = r.rc.export
    scores: dict = {}

    def work(st: Stage) -> None:
        got, missed = _evaluate_student(r)
        scores.update(got)
        with building(st.folder) as tmp:
            write_json(tmp / "scores.json", scores)
            write_json(tmp / MISSES, missed)

    st = r.stage(
        "evaluate",
        r.dir / "eval" / "pytorch",
        {
            "eval": dataclasses.asdict(r.rc.eval),
            "latency": [e.latency_prompts, e.latency_tokens] if e.enabled else None,
        },
        {"teacher_hash": r.teacher_id, "student_hash": r.student_hash, "data_hash": r.data_hash},
        work,
        on="main-only",
    )
    return scores or json.loads((st.folder / "scores.json").read_text())


MISSES = "misses.json"  # in each evaluation folder: the examples the model got wrong, beside the teacher's answers


def _evaluate_student(r: Run) -> tuple[dict, dict]:
    from distill.evaluate import evaluate_model, hf_generate_n, latency
    from families.hf import config_param_count, load_causal_lm

    ev, enc, tok, e = _ev(r.rc), r.enc, r.tokenizer, r.rc.export
    t = teacher_answers(r)
    student = load_causal_lm(r.dir / "student")  # score the artifact we ship, exactly as a user would load it
    got, missed = {}, {}
    for split in EVAL_SPLITS:
        if not enc[split]:
            continue
        t_ans = teacher_split_answers(t, split)
        got[split], answers = evaluate_model(
            student, tok, enc[split], teacher=teacher_reference(r, t, split), teacher_answers=t_ans, **ev
        )
        missed[split] = misses(tok, enc[split], answers, t_ans)
    scores = {
        "teacher": dict(t["test"]),
        "student": {**got["test"], "num_params": config_param_count(student.config), "heldout": got.get("heldout", {})},
        "teacher_answers": t["answers"],
    }
    if e.enabled:
        model = r.teacher.get()
        timed_prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in enc["test"][: e.latency_prompts]]
        for who, m, folder in (("teacher", model, r.teacher.folder), ("student", student, r.dir / "student")):
            gen = hf_generate_n(m, tok.pad_token_id)
            scores[who].update({"bytes": safetensors_bytes(folder), **latency(gen, timed_prompts, e.latency_tokens)})
    return scores, missed


def teacher_split_answers(t: dict, split: str) -> list[list[int]]:
    """The teacher's greedy answers on ``split`` from ``teacher_answers``' record."""
    return t["answers"] if split == "test" else t["heldout_answers"]


def misses(tok, data: list[dict], answers: list[list[int]], t_answers: list[list[int]]) -> list[dict]:
    """The examples whose answer is not the reference (as ``distill.metrics.score`` judges exact match),
    each with the request, reference, the model's and the teacher's answers and the example's tags."""
    from distill.metrics import is_exact

    out = []
    for ex, a, ta in zip(data, answers, t_answers, strict=True):
        text = tok.decode(a, skip_special_tokens=True)
        if is_exact(text, ex["answer"]):
            continue
        teacher = tok.decode(ta, skip_special_tokens=True)
        out.append(
            {
                "request": ex.get("request", ""),
                "reference": ex["answer"],
                "answer": text,
                "teacher": teacher,
                "teacher_right": is_exact(teacher, ex["answer"]),
                **ex.get("tags", {}),
            }
        )
    return out


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def retention_metrics(r: Run, scores: dict, info: dict) -> dict:
    """metrics.json's core: teacher and student scores, retention, training summary (``info``: the
    student's distill_info.json)."""
    from distill.metrics import slice_retention

    t_test, s_test = scores["teacher"], scores["student"]
    t_held, s_held = t_test.get("heldout", {}), s_test.get("heldout", {})
    return {
        "name": r.rc.name,
        "data_hash": r.data_hash,
        "teacher_dir": str(r.teacher_dir),
        "teacher_hash": r.teacher_hash,
        "student_hash": r.student_hash,
        "teacher": t_test,
        "student": s_test,
        "retention": {
            "exact_match": (ret := s_test["exact_match"] / max(t_test["exact_match"], 1e-9)),
            "target": r.rc.eval.retention_target,
            "met": ret >= r.rc.eval.retention_target,
            "param_ratio": s_test["num_params"] / t_test["num_params"],
            "heldout_exact_match": (s_held.get("exact_match", 0.0) / max(t_held.get("exact_match", 0.0), 1e-9))
            if t_held
            else None,
            "heldout_parts": slice_retention(s_held, t_held, "part") if t_held else {},
        },
        "train": {k: v for k, v in info.items() if k != "history"},
        **({"train_data": {"task": len(r.enc["train"]), **r.mix_info}} if r.mix_info else {}),
    }


# ---- ship: export -> quantize -> evaluate every ONNX variant -> gate ----


def build_onnx_variants(r: Run, calibration: list[list[int]]) -> dict[str, Stage]:
    """Export the student (fp32, optionally fp16) and quantize it: variant name -> its finished ``Stage``
    (folder ``DIR/onnx/<variant>``). Each folder is a stage (``export``, ``export:fp16``, ``quantize:<v>``)."""
    from export.onnx import export_onnx, resolve_exporter, to_float16
    from families.hf import read_config
    from quantize import SCHEMES, Build

    e, onnx_dir = r.rc.export, r.dir / "onnx"
    out = {}

    def export_stage(name: str, folder: Path, student: Path, student_hash: str) -> Stage:
        exporter = resolve_exporter(e.exporter, read_config(student), openvino_on(r.rc) and e.deploy_batch > 1)
        return r.stage(
            name,
            folder,
            {"exporter": exporter, "opset": e.opset, "verify_atol": e.verify_atol, "verify_rtol": e.verify_rtol},
            {"student_hash": student_hash},
            lambda st: export_onnx(
                student,
                st.folder,
                opset=e.opset,
                verify_atol=e.verify_atol,
                verify_rtol=e.verify_rtol,
                exporter=exporter,
            ),
            on="main-only",
        )

    out["fp32"] = fp32 = export_stage("export", onnx_dir / "fp32", r.dir / "student", r.student_hash)
    src = {"fp32_hash": fp32.output_hash}
    if e.fp16:
        out["fp16"] = r.stage(
            "export:fp16", onnx_dir / "fp16", {}, src, lambda st: to_float16(fp32.folder, st.folder), on="main-only"
        )
    probe = [ex["input_ids"] for ex in r.enc["validation"][: r.rc.quantize.probe_examples]]
    for v in r.rc.quantize.variants:
        scheme, settings = SCHEMES[v], getattr(r.rc.quantize, v)
        cal = scheme.calibration(settings, calibration)
        inputs = {**src, **({"calibration": digest(cal)} if cal else {}), **({"probe": digest(probe)} if probe else {})}
        build = {"src": fp32.folder, "settings": settings, "calibration": calibration, "probe": probe}
        if scheme.trained:  # quantization-aware distillation: the student trained on the grid, then exported
            student = r.qad[v]  # trained by ``quantization_aware`` on every process, before this main-only section
            base = export_stage(f"export:{v}", r.dir / "qad" / v / "fp32", student.folder, student.output_hash)
            inputs["qad_hash"] = base.output_hash
            qad_info = json.loads((student.folder / "qad_info.json").read_text())
            build.update(src=base.folder, qad=qad_info["summary"], reference=fp32.folder)
        if scheme.needs_student:  # the PyTorch student and answer starts: per-weight sensitivity
            val = r.enc["validation"][: settings.examples]
            seqs, starts = [ex["input_ids"] for ex in val], [ex["prompt_len"] - 1 for ex in val]
            inputs.update({"student_hash": r.student_hash, "sensitivity_data": digest([seqs, starts])})
            build.update(student=r.dir / "student", sequences=seqs, starts=starts)
        out[v] = r.stage(
            f"quantize:{v}",
            onnx_dir / v,
            dataclasses.asdict(settings),
            inputs,
            lambda st, scheme=scheme, build=build: scheme.build(Build(dest=st.folder, **build)),
            on="main-only",
        )
    return out


def quantization_aware(r: Run) -> None:
    """Run the QAD stage of every trained scheme in ``quantize.variants`` (``r.qad``). Every process trains,
    so this runs before the main-process-only export section (which then finds the stages finished)."""
    from quantize import SCHEMES

    for v in r.rc.quantize.variants:
        if SCHEMES[v].trained:
            r.qad[v] = qad(r, v, getattr(r.rc.quantize, v))


def qad(r: Run, name: str, s) -> Stage:
    """Quantization-aware distillation for scheme ``name``: the distilled student, its weights on the
    scheme's int4 grid in every forward (``quantize.fake``: ONNX Runtime's round-to-nearest blocks, straight-
    through gradients), trained ``s.steps`` more steps against the teacher with the distillation's loss,
    then baked onto the grid: ``DIR/qad/<name>/student``, a plain HF folder whose float weights are exactly
    what the int4 file will hold."""
    rc = r.rc
    tc = dataclasses.replace(
        rc.distill.train, steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, eval_every=0, checkpoint_every=0
    )
    # the logit loss only: the feature projections of distillation were not kept, on-policy sampling is slow
    dcfg = dataclasses.replace(
        rc.distill,
        features=dataclasses.replace(rc.distill.features, weight=0.0),
        on_policy=dataclasses.replace(rc.distill.on_policy, fraction=0.0),
        train=tc,
    )
    tied = json.loads((r.dir / "student" / "config.json").read_text()).get("tie_word_embeddings", False)
    config = {  # a tied embedding trains on the grid either way: ``embedding`` changes training only when untied
        "grid": {"bits": 4, "block_size": s.block_size, "symmetric": True, "embedding": s.embedding and not tied},
        "train": key_settings(dataclasses.asdict(dcfg)),
        "max_length": rc.data.max_length,
        "processes": r.acc.num_processes,
    }
    inputs = {
        "student_hash": r.student_hash,
        "teacher_hash": r.teacher_id,
        "data_hash": r.data_hash,
        **{f"{k}_hash": v for k, v in r.mix_hash.items()},
    }

    def work(st: Stage) -> None:
        from distill.train import final_model, make_mode, train
        from families.hf import load_causal_lm, save_model_atomically
        from quantize import fake

        student = load_causal_lm(r.dir / "student")
        names = fake.attach(student, bits=4, block=s.block_size, embedding=s.embedding)
        live = r.signals is None
        result = train(
            student,
            r.tokenizer,
            r.train_data(),
            tc,
            accelerator=r.acc,
            mode=make_mode(dcfg, teacher=r.teacher.get() if live else None, signals=None if live else r.signals),
            desc=f"qad:{name}",
            log_prefix=f"qad_{name}/",
        )
        student = final_model(r.acc, student, result)
        if r.main:
            written = fake.bake(student)
            summary = {
                "steps": tc.steps,
                "lr": tc.lr,
                "seconds": result.seconds,
                "tokens": result.tokens,
                "modules": len(names),
                "tensors": written,
                "final_loss": result.history[-1]["loss"] if result.history else None,
            }
            info = {"summary": summary, "grid": config["grid"], "modules": names, "history": result.history}
            save_model_atomically(student, r.tokenizer, st.folder, {"qad_info.json": info})
            log.info(
                "QAD %s: %d steps in %.0f s, %d weight tensors on the int4 grid",
                name,
                tc.steps,
                result.seconds,
                written,
            )
        r.acc.wait_for_everyone()

    return r.stage(f"qad:{name}", r.dir / "qad" / name / "student", config, inputs, work)


def ship(r: Run, t_test: dict) -> dict:
    """Export -> quantize -> evaluate every ONNX variant under ONNX Runtime -> release gate.

    Returns the ``metrics.json`` entries: ``onnx_<variant>`` objects (task metrics against the teacher,
    ``bytes``, ``ms_per_token``, ``prefill_ms``, quantization settings, OpenVINO agreement) and ``gate``."""
    from quantize import SCHEMES

    rc = r.rc
    settings = [getattr(rc.quantize, v) for v in SCHEMES]
    n_calib = max(getattr(s, "calib_examples", 0) for s in settings)  # not a knob: schemes without calibration
    calibration = [ex["input_ids"] for ex in r.enc["train"][:n_calib]]
    variants = build_onnx_variants(r, calibration)
    t_answers = teacher_answers(r)
    use_ov = openvino_on(rc)
    out: dict = {}
    for v, made in variants.items():
        name = f"onnx_{v}"
        scores: dict = {}
        ov = use_ov and v in rc.gate.variants  # the files that ship are also checked under OpenVINO

        def work(st: Stage, made=made, scores=scores, ov=ov) -> None:
            got, missed = _evaluate_onnx(r, made.folder, ov)
            scores.update(got)
            with building(st.folder) as tmp:
                write_json(tmp / "scores.json", scores)
                write_json(tmp / MISSES, missed)
            write_json(made.folder / "metrics.json", scores)  # the artifact carries its own numbers

        st = r.stage(
            f"evaluate:{name}",
            r.dir / "eval" / name,
            {
                "eval": dataclasses.asdict(rc.eval),
                "latency": [rc.export.latency_prompts, rc.export.latency_tokens],
                "deploy_batch": [rc.export.deploy_batch, rc.export.invariance_examples],
                "openvino": ov,
                **({"openvino_examples": rc.export.openvino_examples} if ov else {}),
            },
            {
                "model_hash": made.output_hash,
                "teacher_hash": r.teacher_id,
                "teacher_answers": digest([t_answers["answers"], t_answers.get("heldout_answers")]),
                "data_hash": r.data_hash,
            },
            work,
            on="main-only",
        )
        out[name] = scores or json.loads((st.folder / "scores.json").read_text())
    out["gate"] = gate(r, t_test, out)
    return out


def _evaluate_onnx(r: Run, folder: Path, use_ov: bool) -> tuple[dict, dict]:
    """One ONNX variant under ONNX Runtime on test and heldout: (scores, misses). The test scores are the
    top level, the heldout ones under ``heldout``; with ``use_ov`` the same file under OpenVINO on the first
    ``export.openvino_examples`` of each split (``openvino_match``: the lower share of identical answers)."""
    import torch

    from core.onnx_files import onnx_bytes
    from distill.evaluate import answer_budget, batch_invariance, evaluate_onnx, latency, onnx_generate_n
    from export.runtime import OnnxCausalLM

    rc, enc = r.rc, r.enc
    deploy, batch, check = rc.export.deploy_batch, rc.export.deploy_batch, None
    t = teacher_answers(r)
    got, answers, missed = {}, {}, {}
    with torch.no_grad():
        runner = OnnxCausalLM(folder)
        if rc.export.invariance_examples and rc.eval.batch_size != deploy:
            # scored at the batch that ships, unless shown not to depend on the batch (then at eval.batch_size)
            sample = enc["test"][: rc.export.invariance_examples]
            budget = rc.eval.max_new_tokens or answer_budget(enc["test"])
            check = batch_invariance(runner, sample, budget, deploy, rc.eval.batch_size, rc.eval.chunk_size)
            batch = rc.eval.batch_size if check["invariant"] else deploy
        settings = {**_ev(rc), "batch_size": batch}
        for split in EVAL_SPLITS:
            if enc[split]:
                t_ans = teacher_split_answers(t, split)
                ref = teacher_reference(r, t, split)
                got[split], answers[split] = evaluate_onnx(
                    runner, r.tokenizer, enc[split], teacher=ref, teacher_answers=t_ans, **settings
                )
                missed[split] = misses(r.tokenizer, enc[split], answers[split], t_ans)
    scores = {**got["test"], **({"heldout": got["heldout"]} if "heldout" in got else {})}
    scores["batch"], scores["deploy_batch"] = batch, deploy
    if check is not None:
        scores["batch_invariance"] = check
        log.info(
            "onnx %s: %s at batch %d (%s)",
            folder.name,
            "scored" if batch == deploy else "batch-invariant, scored",
            batch,
            f"ops mixing rows: {', '.join(check['ops_mixing_rows'])}"
            if check["ops_mixing_rows"]
            else f"{check['identical_answers']:.3f} of {check['examples']} answers identical at batch {deploy} and "
            f"{rc.eval.batch_size}, argmax identical: {check['identical_argmax']}",
        )
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in enc["test"][: rc.export.latency_prompts]]
    scores.update(latency(onnx_generate_n(runner), prompts, rc.export.latency_tokens))
    scores["bytes"] = onnx_bytes(folder)
    qinfo = folder / "quantization.json"
    if qinfo.is_file():
        info = json.loads(qinfo.read_text())
        scores["quantization"] = info["settings"]
        if "vs_source" in info:
            scores["vs_fp32"] = info["vs_source"]
        if "vs_fake_quant" in info:  # QAD: the file against the fake-quantized model it was trained as
            scores["vs_fake_quant"] = info["vs_fake_quant"]
    if use_ov:
        matches = []
        for split in answers:
            n_ov = rc.export.openvino_examples or len(enc[split])
            budget = rc.eval.max_new_tokens or answer_budget(enc[split])
            ov = cross_runtime(
                folder, runner, answers[split][:n_ov], enc[split][:n_ov], budget, deploy, rc.eval.chunk_size
            )
            (scores if split == "test" else scores[split])["openvino"] = ov
            if "generation_match" in ov:  # (absent when OpenVINO cannot load the file: not measured)
                matches.append(ov["generation_match"])
        if matches and len(matches) == len(answers):
            scores["openvino_match"] = min(matches)
    log.info(
        "onnx %s: exact match %.3f (heldout %s), agreement %.4f, KL %.4f, %.0f bytes, %.2f ms/token",
        folder.name,
        scores["exact_match"],
        f"{scores['heldout']['exact_match']:.3f}" if "heldout" in scores else "-",
        scores["agreement"],
        scores["kl"],
        scores["bytes"],
        scores["ms_per_token"],
    )
    return scores, missed


def gate(r: Run, t_test: dict, measured: dict) -> dict:
    """The release verdict on the shipped variants (``gate.variants``) under ``gate.*`` thresholds."""
    from export.gate import evaluate_gate, thresholds_of

    g = r.rc.gate
    thresholds = thresholds_of(g)
    judged = {f"onnx_{v}": measured[f"onnx_{v}"] for v in g.variants}
    verdict: dict = {}

    def work(st: Stage) -> None:
        verdict.update(evaluate_gate(t_test, judged, thresholds, g.min_teacher_score).to_dict())
        with building(st.folder) as tmp:
            write_json(tmp / "gate.json", verdict)

    st = r.stage(
        "gate",
        r.dir / "gate",
        {"thresholds": thresholds, "variants": list(g.variants), "min_teacher_score": g.min_teacher_score},
        {"teacher": digest(t_test), **{k: digest(v) for k, v in judged.items()}},
        work,
        on="main-only",
    )
    return verdict or json.loads((st.folder / "gate.json").read_text())


def cross_runtime(
    folder: Path, runner, answers, data: list[dict], max_new_tokens: int, batch_size: int, chunk_size: int
) -> dict:
    """The same ONNX file under OpenVINO (CPU, f32 precision hint) on ``data``: share of greedy answers
    identical to ONNX Runtime's (``answers``: ORT's on the same examples), argmax agreement and largest
    logit difference on the reference sequences, compared a few rows at a time (about ``chunk_size``
    tokens: two runtimes' full logits of a whole split would not fit in memory at a large vocabulary)."""
    import numpy as np

    from export.runtime import OnnxCausalLM

    try:
        ov = OnnxCausalLM(folder, backend="openvino")
    except Exception as err:  # an op OpenVINO's ONNX frontend lacks: report, do not fail the run
        log.warning("openvino could not load %s: %s", folder, err)
        return {"error": str(err).splitlines()[0][:300]}
    from distill.evaluate import by_length

    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in data]
    ov_answers = by_length(
        prompts, lambda p: ov.generate(p, max_new_tokens, batch_size=batch_size)
    )  # batched as ORT's were
    seqs = sorted((ex["input_ids"] for ex in data), key=len)
    same, total, diff = 0, 0, 0.0
    start = 0
    while start < len(seqs):
        rows = 1  # as many rows as keep the chunk within chunk_size tokens (rows grow longer: sorted)
        while rows < batch_size and start + rows < len(seqs) and len(seqs[start + rows]) * (rows + 1) <= chunk_size:
            rows += 1
        part = seqs[start : start + rows]
        for x, y in zip(runner.sequence_logits(part, rows), ov.sequence_logits(part, rows), strict=True):
            same += int((x.argmax(-1) == y.argmax(-1)).sum())
            total += x.shape[0]
            diff = max(diff, float(np.abs(x - y).max()))
        start += rows
    return {
        "examples": len(data),
        "generation_match": sum(x == y for x, y in zip(answers, ov_answers, strict=True)) / max(len(answers), 1),
        "argmax_agreement": same / max(total, 1),
        "max_logit_diff": diff,
    }
