"""The task teacher, trained once and cached: from scratch (``bootstrap``: a small Qwen2 with GQA and its
own BPE tokenizer) or from a pretrained model (``finetune``: full or LoRA, on the run's training data).

Both are the same stage: cross-entropy on the answers, test scores in ``teacher.json``, an atomic save
into ``teacher.cache_dir/teachers/<key>``, the key hashing the settings, the data version and (for a
fine-tune) the base folder's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from distill.config import BootstrapConfig, EvalConfig, FinetuneConfig, TeacherConfig, key_settings

log = logging.getLogger(__name__)
BOOTSTRAP_VERSION = "qwen2-bootstrap/1"
FINETUNE_VERSION = "finetune/1"
# Part of the bootstrap recipe (like BOOTSTRAP_VERSION, not a knob): tokens per logit chunk of its
# cross-entropy. Every cached bootstrapped teacher was trained with it.
BOOTSTRAP_CHUNK_SIZE = 1024
# Part of the bootstrap recipe too: the share of ``teacher.bootstrap.random_values`` values drawn in the
# other script (Latin names in Chinese requests and the reverse).
RANDOM_CROSS_SCRIPT = 0.25


def bootstrap_key(b: BootstrapConfig, data_hash: str) -> str:
    blob = json.dumps(
        {"v": BOOTSTRAP_VERSION, "data": data_hash, **key_settings(dataclasses.asdict(b))}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(tc: TeacherConfig) -> Path:
    return Path(os.path.expanduser(tc.cache_dir))


def bootstrap_dir(tc: TeacherConfig, data_hash: str) -> Path:
    """Where the teacher bootstrapped with these settings on this data is cached."""
    return cache_root(tc) / "teachers" / bootstrap_key(tc.bootstrap, data_hash)


def finetune_key(f: FinetuneConfig, data_hash: str, base_hash: str) -> str:
    blob = {"v": FINETUNE_VERSION, "data": data_hash, "base": base_hash, **key_settings(dataclasses.asdict(f))}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def finetune_dir(tc: TeacherConfig, data_hash: str, base_hash: str) -> Path:
    """Where ``base`` fine-tuned with these settings on this data is cached."""
    return cache_root(tc) / "teachers" / f"ft-{finetune_key(tc.finetune, data_hash, base_hash)}"


def gguf_dir(tc: TeacherConfig, sha256: str) -> Path:
    """Where the GGUF file with this content is cached as a Hugging Face folder."""
    return cache_root(tc) / "teachers" / f"gguf-{sha256[:16]}"


def bootstrap_teacher(
    tc: TeacherConfig,
    data: dict[str, list[dict]],
    data_hash: str,
    ec: EvalConfig,
    *,
    accelerator,
    max_length: int,
    force: bool = False,
    avoid: frozenset[str] = frozenset(),
) -> Path:
    """Path of the cached bootstrapped teacher, training it first when the cache has none.

    Trains a byte-level BPE tokenizer on the training split, then a Qwen2 model with grouped-query
    attention with plain cross-entropy on the answers (``train_teacher``). With ``random_values``, that
    share of the training examples carries random open values (never a word or character in ``avoid``:
    the held-out values), so the teacher copies values it never saw as a pretrained teacher does.
    """
    from transformers import Qwen2Config

    from distill.data.tokenize import train_tokenizer
    from families.hf import build_from_config

    b = tc.bootstrap
    dest = bootstrap_dir(tc, data_hash)
    if (dest / "config.json").is_file() and not force:
        log.info("teacher: reusing cached bootstrap %s", dest)
        return dest
    log.info("teacher: no cached teacher at %s; bootstrapping one (once)", dest)
    original = data["train"]
    if b.random_values:  # a stand-in for pretraining: the teacher learns to copy any name, place or text
        from distill.data.augment import randomize

        data = {**data, "train": randomize(original, b.random_values, b.train.seed, avoid, RANDOM_CROSS_SCRIPT)}
    texts = [m["content"] for r in data["train"] for m in r["messages"]]
    tokenizer = train_tokenizer(texts, b.vocab_size)
    if b.random_values:  # a random value can spell long (a CJK character the vocabulary lacks is 2-3 bytes)
        from core.chat import encode

        data["train"] = [
            new if new is old or len(encode(tokenizer, new["messages"])["input_ids"]) <= max_length else old
            for new, old in zip(data["train"], original, strict=True)
        ]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_hidden_layers,
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads,
        max_position_embeddings=b.max_position_embeddings,
        tie_word_embeddings=b.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
    )
    model = build_from_config(config, b.train.seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    info = {"key": bootstrap_key(b, data_hash), "data_hash": data_hash, "settings": dataclasses.asdict(b)}
    train_teacher(
        model,
        tokenizer,
        data,
        b.train,
        ec,
        dest,
        info,
        accelerator=accelerator,
        max_length=max_length,
        min_exact_match=b.min_exact_match,
        what="bootstrapped",
        hint="raise teacher.bootstrap.train.steps",
    )
    return dest


def finetune_teacher(
    tc: TeacherConfig,
    base: Path,
    base_hash: str,
    data: dict[str, list[dict]],
    data_hash: str,
    ec: EvalConfig,
    *,
    accelerator,
    max_length: int,
    force: bool = False,
    chat_template: str | None = None,
    targets: str = "all",
    fmt: str | None = None,
) -> Path:
    """Path of ``base`` fine-tuned on the run's training data (full, or LoRA merged back), training it
    first when the cache has none. The tokenizer is the base's (a pad token is chosen and recorded when it
    has none) with its chat template, or ``chat_template`` (saved with the teacher) when given; ``targets``
    and ``fmt``: as for ``distill.data.encode_records``."""
    from transformers import AutoTokenizer

    from core.chat import ensure_pad
    from distill.train import apply_lora
    from families.hf import load_causal_lm

    f = tc.finetune
    dest = finetune_dir(tc, data_hash, base_hash)
    if (dest / "config.json").is_file() and not force:
        log.info("teacher: reusing cached fine-tune %s", dest)
        return dest
    how = f"LoRA r={f.lora.r}" if f.lora.enabled else "full"
    log.info(
        "teacher: fine-tuning %s on the training data (%s, %d steps), once, into %s", base, how, f.train.steps, dest
    )
    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=tc.trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    ensure_pad(tokenizer)
    model = load_causal_lm(base, trust_remote_code=tc.trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    trainable = apply_lora(model, f.lora) if f.lora.enabled else model
    info = {
        "key": finetune_key(f, data_hash, base_hash),
        "data_hash": data_hash,
        "base": str(base),
        "base_hash": base_hash,
        "settings": dataclasses.asdict(f),
    }
    train_teacher(
        trainable,
        tokenizer,
        data,
        f.train,
        ec,
        dest,
        info,
        accelerator=accelerator,
        max_length=max_length,
        min_exact_match=f.min_exact_match,
        what="fine-tuned",
        hint="raise teacher.finetune.train.steps or lr",
        targets=targets,
        fmt=fmt,
    )
    return dest


def train_teacher(
    model,
    tokenizer,
    data: dict[str, list[dict]],
    train_cfg,
    ec: EvalConfig,
    dest: Path,
    info: dict,
    *,
    accelerator,
    max_length: int,
    min_exact_match: float,
    what: str,
    hint: str,
    targets: str = "all",
    fmt: str | None = None,
) -> None:
    """Cross-entropy on the answers, test scores, then an atomic save of ``dest`` with ``teacher.json``
    (settings, parameters, training time and tokens/s, test scores). A killed run leaves no folder that
    looks finished."""
    import torch

    from distill.data import encode_records
    from distill.evaluate import OWN_EVAL, OWN_TOPK, eval_settings, evaluate_model, split_key
    from distill.train import CrossEntropy, final_model, train
    from families.hf import param_count, save_model_atomically

    acc = accelerator
    train_enc = encode_records(tokenizer, data["train"], max_length, "data.train", targets, fmt)
    result = train(
        model,
        tokenizer,
        train_enc,
        train_cfg,
        accelerator=acc,
        mode=CrossEntropy(BOOTSTRAP_CHUNK_SIZE),
        desc=f"teacher ({what})",
        log_prefix="teacher/",
    )
    model = final_model(acc, model, result)  # LoRA merged; gathered to the main process when sharded
    info = {
        **info,
        "num_params": param_count(model) if model is not None else None,
        "train_seconds": result.seconds,
        "train_tokens": result.tokens,
        "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
    }
    if acc.is_main_process:
        model.eval()
        test = encode_records(tokenizer, data["test"][: ec.num_test or None], max_length, "data.test", targets, fmt)
        with torch.no_grad():
            scores, answers = evaluate_model(model, tokenizer, test, keep_topk=ec.kl_topk, **eval_settings(ec))
        signals = scores.pop("signals", None)
        info["test"] = scores
        # The evaluate stage needs exactly this again (the teacher's test answers and top-k signals): the
        # folder carries it, keyed by the token ids and eval settings, so it is not recomputed.
        own = {"key": split_key(test, ec), "scores": scores, "answers": answers}
        log.info(
            "teacher: %s %d params in %.0f s; test exact match %.3f",
            what,
            info["num_params"],
            result.seconds,
            scores["exact_match"],
        )
        if scores["exact_match"] < min_exact_match:
            log.warning(
                "teacher: the %s teacher reaches only %.3f exact match on test (wanted %.2f); %s",
                what,
                scores["exact_match"],
                min_exact_match,
                hint,
            )
        save_model_atomically(
            model,
            tokenizer,
            dest,
            {"teacher.json": info, OWN_EVAL: own},
            tensors={OWN_TOPK: signals.tensors()} if signals is not None else None,
        )
    acc.wait_for_everyone()
