"""Teacher and data: the splits, the teacher (a user's folder or GGUF file, fine-tuned or not, or the
bootstrapped one, cached), the extra training pools (teacher-labelled augmented requests, general text;
cached per teacher) and the teacher's cached top-k signals.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from core.files import building, write_json
from core.hashing import digest
from distill.config import ConfigError, key_settings, student_plan
from distill.manifest import Stage
from distill.stages.run import SPLITS, Data, LazyTeacher, Run, Teacher, timed

if TYPE_CHECKING:  # it imports torch: imported where used
    from distill.signals import TopKSignals

log = logging.getLogger("distill")


# ---- data and teacher ----


def load_data(r: Run) -> Data:
    """Every split's records (generated or read from the user's files) and their hash."""
    from distill.data import DataError, data_hash, load_records

    with timed("data"):
        data = Data({s: load_records(r.rc.data, s) for s in SPLITS}, data_hash(r.rc.data))
        for s in ("train", "test"):
            if not data.records[s]:
                raise DataError(f"data: the {s} split is empty")
        log.info("data %s: %s", data.hash, ", ".join(f"{s}={len(data.records[s])}" for s in SPLITS))
    return data


def teacher(r: Run) -> Teacher:
    """The task teacher: a user's folder (hashed) or GGUF file (converted once into a cached folder),
    optionally fine-tuned on the training data; or, without ``teacher.path``, the bootstrapped one. Then
    the tokenizer, the encoded splits, the teacher identity and the prune plan for its real config."""
    from transformers import AutoTokenizer

    from core.chat import ensure_pad
    from core.hashing import folder_hash
    from distill.data import encode_records, encoding, prepare_tokenizer, uses_tools
    from families.gguf import file_sha256, is_gguf
    from families.hf import read_config, vocab_problems

    rc = r.rc
    key = "teacher.path" if rc.teacher.path else "teacher"
    records = [x for s in SPLITS for x in r.data.records[s]]
    if rc.teacher.path:
        sha = file_sha256(rc.teacher.path) if is_gguf(Path(rc.teacher.path)) else None
        # template and length problems are reported before a GGUF conversion or a fine-tune loads weights
        problems = _source_problems(r, records, key, sha)
        if problems:
            raise ConfigError(problems)
        folder = source_teacher(r, sha)
        if rc.teacher.finetune.enabled:
            r.base = folder
            folder = finetuned_teacher(r, folder)
    elif uses_tools(records):
        raise ConfigError(
            [
                "data: function-calling data (tools, tool_calls, tool turns) needs a pretrained teacher with a chat "
                "template (teacher.path=...); the bootstrapped demo teacher's small template renders no tools"
            ]
        )
    else:
        folder = bootstrapped_teacher(r)
    t_cfg = read_config(folder)
    problems = []
    if rc.student.init == "folder":
        problems += vocab_problems(folder, rc.student.path, "student.path", rc.teacher.trust_remote_code)
    problems += _length_problems(rc, t_cfg)
    if problems:
        raise ConfigError(problems)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=rc.teacher.trust_remote_code)
    problems = prepare_tokenizer(tok, rc.data, records, key)  # the template then travels with every artifact
    if problems:
        raise ConfigError(problems)
    pad = ensure_pad(tok)
    if pad is not None:
        log.info("the tokenizer has no pad token: padding with %s (masked out of attention and every loss)", pad)
    how = encoding(rc.data)
    enc = {s: encode_records(tok, r.data.records[s], rc.data.max_length, f"data.{s}", **how) for s in SPLITS}
    n_eval = rc.eval.num_test or None
    enc["test"], enc["heldout"] = enc["test"][:n_eval], enc["heldout"][:n_eval]
    content = folder_hash(folder)
    r.stages.record["teacher"]["hash"] = content
    q = rc.teacher.quantization
    out = Teacher(folder, content, content if q == "none" else f"{content}+{q}", LazyTeacher(folder, rc), tok, enc)
    if rc.student.init == "prune":
        # the plan the run started with (``pipeline.start``), unless the teacher's real numbers differ from
        # those it was made from (a bootstrapped teacher's trained tokenizer can be smaller than configured)
        if r.plan is None or any(t_cfg.get(k) != v for k, v in r.plan_teacher.items()):
            r.plan, r.plan_teacher = student_plan(rc, t_cfg), dict(t_cfg)
        for reason in r.plan.reasons:
            log.info("prune plan: %s", reason)
    return out


def _source_problems(r: Run, records: list[dict], key: str, sha: str | None) -> list[str]:
    """The chat template and length problems of ``teacher.path``, from its tokenizer and config alone, where
    weights would load before the teacher's own check: a GGUF file not converted yet (read from the file's
    metadata, a few seconds) and a teacher to fine-tune. A folder used as it is is checked later, also before
    any weights load."""
    from transformers import AutoConfig, AutoTokenizer

    from distill.data import prepare_tokenizer
    from distill.teacher import gguf_dir
    from families.hf import read_config

    tc = r.rc.teacher
    src = Path(tc.path)
    if sha is not None:
        converted = gguf_dir(tc, sha)
        if not (converted / "config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            cfg = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name).to_dict()
            return prepare_tokenizer(tok, r.rc.data, records, key) + _length_problems(r.rc, cfg)
        src = converted
    elif not tc.finetune.enabled:
        return []
    tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=tc.trust_remote_code)
    return prepare_tokenizer(tok, r.rc.data, records, key) + _length_problems(r.rc, read_config(src))


def _length_problems(rc, t_cfg: dict) -> list[str]:
    limit = t_cfg.get("max_position_embeddings")
    if limit and rc.data.max_length > limit:
        return [f"data.max_length={rc.data.max_length} exceeds the teacher's max_position_embeddings={limit}"]
    return []


def _forced(r: Run, name: str) -> bool:
    return name in r.stages.force or "all" in r.stages.force


def source_teacher(r: Run, sha: str | None) -> Path:
    """``teacher.path`` as a folder: itself; as a GGUF file (``sha``: its sha256): the cached folder it converts
    into (stage ``gguf``, keyed by the file's content)."""
    from distill.teacher import gguf_dir
    from families.gguf import convert_gguf

    tc = r.rc.teacher
    src = Path(tc.path)
    if sha is None:
        r.stages.record["teacher"] = {"status": "input", "folder": str(src)}
        return src
    dest = gguf_dir(tc, sha)
    r.stage("gguf", dest, {}, {"gguf_sha256": sha}, lambda st: convert_gguf(src, dest), on="main", shared=True)
    r.stages.record["teacher"] = {"status": "input", "folder": str(dest), "gguf": str(src)}
    return dest


def finetuned_teacher(r: Run, base: Path) -> Path:
    """``base`` fine-tuned on the run's training data (stage ``teacher``, cached by base, data, settings)."""
    import dataclasses as dc

    from core.hashing import folder_hash
    from distill.data import chat_template_text, encoding
    from distill.teacher import finetune_dir, finetune_teacher

    tc = r.rc.teacher
    base_hash = folder_hash(base)
    dest = finetune_dir(tc, r.data.hash, base_hash)

    def work(st: Stage) -> None:
        finetune_teacher(
            tc,
            base,
            base_hash,
            r.data.records,
            r.data.hash,
            r.rc.eval,
            accelerator=r.acc,
            max_length=r.rc.data.max_length,
            force=_forced(r, "teacher"),
            chat_template=chat_template_text(r.rc.data),
            **encoding(r.rc.data),
        )

    inputs = {"data_hash": r.data.hash, "base_hash": base_hash}
    r.stage("teacher", dest, key_settings(dc.asdict(tc.finetune)), inputs, work, shared=True)
    return dest


def bootstrapped_teacher(r: Run) -> Path:
    """The teacher trained from scratch on the task (stage ``teacher``, cached by settings and data)."""
    from distill.teacher import bootstrap_dir, bootstrap_teacher

    rc = r.rc
    dest = bootstrap_dir(rc.teacher, r.data.hash)

    def work(st: Stage) -> None:
        bootstrap_teacher(
            rc.teacher,
            r.data.records,
            r.data.hash,
            rc.eval,
            accelerator=r.acc,
            max_length=rc.data.max_length,
            force=_forced(r, "teacher"),
            avoid=heldout_avoid(r) if rc.teacher.bootstrap.random_values else frozenset(),
        )

    settings = key_settings(dataclasses.asdict(rc.teacher.bootstrap))
    r.stage("teacher", dest, settings, {"data_hash": r.data.hash}, work, shared=True)
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
    from distill.data import encode_records, encoding, read_jsonl
    from distill.teacher import cache_root

    avoid = heldout_avoid(r)
    settings = {k: v for k, v in dataclasses.asdict(a).items() if k != "share"}
    key = {
        "teacher": r.teacher.id,
        "data": r.data.hash,
        "max_length": r.rc.data.max_length,
        "avoid": digest(sorted(avoid)),
    }
    folder = cache_root(r.rc.teacher) / "augment" / digest({**key, **settings})

    def work(st: Stage) -> dict:
        cands = candidates(r.data.records["train"], a.examples, a.seed, avoid, a.cross_script)
        if a.keep == "implied":
            kept, stats = implied(cands, r.teacher.tokenizer, max_length=r.rc.data.max_length)
        else:
            kept, stats = label(
                r.teacher.model.get(),
                r.teacher.tokenizer,
                cands,
                max_length=r.rc.data.max_length,
                batch_size=a.batch_size,
                fmt=encoding(r.rc.data)["fmt"],
            )
        with building(folder) as tmp:
            (tmp / "records.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in kept))
            write_json(tmp / "stats.json", stats)
        return {"kept": stats["kept"], "rejected": stats["rejected"]}

    st = r.stage("augment", folder, settings, key, work, on="main", shared=True)
    kept = read_jsonl(folder / "records.jsonl", key="augment") if (folder / "records.jsonl").stat().st_size else []
    if not kept and a.keep == "consistent":
        log.warning(
            "augment: the teacher answered none of the %d new requests consistently (%s): it does not copy new "
            "values either, so there is nothing to distil from them; the run goes on without them "
            "(distill.augment.keep=implied trains on the calls the new values imply instead)",
            a.examples,
            folder / "stats.json",
        )
    elif not kept:
        log.warning(
            "augment: none of the %d new requests fits data.max_length (%s); the run goes on without them",
            a.examples,
            folder / "stats.json",
        )
    r.pools.examples["augment"] = encode_records(
        r.teacher.tokenizer, kept, r.rc.data.max_length, "augment", **encoding(r.rc.data)
    )
    r.pools.hashes["augment"] = st.output_hash
    stats = json.loads((folder / "stats.json").read_text())
    r.pools.info["augment"] = {
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

    return heldout_units(r.data.records["heldout"])


def general(r: Run) -> None:
    """``distill.general``: general-text sequences sampled from random first tokens (data-free) by the
    teacher or, ``writer: base``, by the pretrained model it was fine-tuned from; or a user's corpus. Cached
    per (teacher, writer, settings). The KD targets on them are the teacher's logits either way."""
    g = r.rc.distill.general
    if not g.examples:
        return
    from core.hashing import sha256_file
    from distill.general import as_examples, sample_general
    from distill.teacher import cache_root

    settings = key_settings({k: v for k, v in dataclasses.asdict(g).items() if k not in ("share", "file")})
    base = r.base if g.writer == "base" and not g.file else None  # validated: a fine-tuned teacher.path
    # the teacher's id names its base too (the fine-tune stage is keyed by the base's hash): not hashed again
    key = {
        "teacher": r.teacher.id,
        "tokens": len(r.teacher.tokenizer),
        **({"file": sha256_file(Path(g.file))} if g.file else {}),
    }
    folder = cache_root(r.rc.teacher) / "general" / digest({**key, **settings})

    def work(st: Stage) -> dict:
        if g.file:
            seqs = corpus_sequences(g.file, r.teacher.tokenizer, g.examples, g.length)
        else:
            writer = LazyTeacher(base, r.rc).get() if base else r.teacher.model.get()
            seqs = sample_general(
                writer, r.teacher.tokenizer, g.examples, g.length, g.temperature, g.seed, g.batch_size
            )
            del writer
        with building(folder) as tmp:
            write_json(tmp / "sequences.json", seqs)
        return {"sequences": len(seqs)}

    st = r.stage("general", folder, settings, key, work, on="main", shared=True)
    r.pools.general_sequences = json.loads((folder / "sequences.json").read_text())
    r.pools.examples["general"] = as_examples(r.pools.general_sequences)
    r.pools.hashes["general"] = st.output_hash
    r.pools.info["general"] = {"sequences": len(r.pools.general_sequences), "length": g.length, "share": g.share}
    log.info(
        "general text: %d sequences of %d tokens at %.0f%% of every batch",
        len(r.pools.general_sequences),
        g.length,
        100 * g.share,
    )


def pool_use(r: Run) -> None:
    """How much of each extra pool training reads: the distillation's steps (and QAD's, on the same seeded
    batches) draw each pool's count per global batch, a whole shuffled epoch before any repeat, so a pool
    larger than that is partly labelled or generated for nothing (minutes of a cold run). Logged with the
    size that would do, and kept in metrics.json (``train_data.<pool>.read``)."""
    import math

    from quantize import SCHEMES

    rc = r.rc
    tc = rc.distill.train
    steps = max([tc.steps, *(getattr(rc.quantize, v).steps for v in rc.quantize.variants if SCHEMES[v].trained)])
    mix, batch = r.train_data(), tc.batch_size * r.acc.num_processes
    counts, read = mix.counts(batch), mix.seen(batch, steps * tc.grad_accum)
    for name, pool in sorted(r.pools.examples.items()):
        p = next((i for i, d in enumerate(mix.pools) if d is pool), None)
        if p is None:
            continue  # empty, or at share 0: not trained on
        info, size, k, n_read = r.pools.info[name], len(pool), counts[p], read[p]
        if name == "general" and rc.student.init == "prune":
            n_read = max(n_read, min(size, rc.student.prune.calib_general))  # pruning's calibration reads these
        info["read"] = n_read
        drawn = k * steps * tc.grad_accum
        if n_read == size:
            log.info("%s: %d steps read all %d examples (%.1f times each)", name, steps, size, drawn / size)
            continue
        if name == "augment":
            made = r.rc.distill.augment.examples
            need = math.ceil(n_read * made / max(info["kept"], 1))
            fix = f"distill.augment.examples={need} would label about that many at this run's {info['kept'] / made:.0%} kept"
        else:
            fix = f"distill.general.examples={n_read} would make just those"
        log.info(
            "%s: %d steps read %d of the %d examples (%d a batch); %d are never trained on: %s",
            name, steps, n_read, size, k, size - n_read, fix,
        )  # fmt: skip


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


def signals(r: Run) -> TopKSignals:
    from distill.signals import TopKSignals, compute_topk, save_signals, signals_key
    from distill.teacher import cache_root

    d, tok = r.rc.distill, r.teacher.tokenizer
    data = list(r.train_data())  # the task data and the extra pools, in the order train() indexes them
    key = signals_key(r.teacher.id, r.data.hash, r.rc.data.max_length, d.topk, d.temperature, len(tok))
    if r.pools.hashes:
        key["mix"] = dict(r.pools.hashes)
    folder = cache_root(r.rc.teacher) / "signals" / digest(key)

    def compute(st: Stage) -> dict:
        tensors = compute_topk(
            r.teacher.model.get(), data, tok.pad_token_id, len(tok), d.topk, d.temperature, d.chunk_size
        )
        with building(folder) as tmp:
            save_signals(tensors, tmp, key)
        return {"tokens": int(tensors["offsets"][-1]), "examples": len(data)}

    st = r.stage("signals", folder, {"k": d.topk, "temperature": d.temperature}, key, compute, on="main", shared=True)
    out = TopKSignals(folder)
    out.key = st.output_hash
    if len(out) != len(data):
        raise RuntimeError(f"{folder}: cached signals cover {len(out)} examples, the data has {len(data)}")
    log.info("teacher signals: top-%d of %d tokens from %s", out.k, out.tokens, folder)
    return out
