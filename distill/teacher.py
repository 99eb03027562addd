"""The teacher: a user's local HF folder, or a small Qwen2 (GQA) model bootstrapped on the task data
once and cached by a hash of its settings and the data version."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from distill.config import BootstrapConfig, EvalConfig, TeacherConfig

log = logging.getLogger(__name__)
BOOTSTRAP_VERSION = "qwen2-bootstrap/1"
# Part of the bootstrap recipe (like BOOTSTRAP_VERSION, not a knob): tokens per logit chunk of its
# cross-entropy. Every cached bootstrapped teacher was trained with it.
BOOTSTRAP_CHUNK_SIZE = 1024


def bootstrap_key(b: BootstrapConfig, data_hash: str) -> str:
    blob = json.dumps({"v": BOOTSTRAP_VERSION, "data": data_hash, **dataclasses.asdict(b)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(tc: TeacherConfig) -> Path:
    return Path(os.path.expanduser(tc.cache_dir))


def bootstrap_dir(tc: TeacherConfig, data_hash: str) -> Path:
    """Where the teacher bootstrapped with these settings on this data is cached."""
    return cache_root(tc) / "teachers" / bootstrap_key(tc.bootstrap, data_hash)


def bootstrap_teacher(
    tc: TeacherConfig,
    data: dict[str, list[dict]],
    data_hash: str,
    ec: EvalConfig,
    *,
    accelerator,
    max_length: int,
    force: bool = False,
) -> Path:
    """Path of the cached bootstrapped teacher, training it first when the cache has none.

    Trains a byte-level BPE tokenizer on the training split, then a Qwen2 model with grouped-query
    attention with plain cross-entropy on the answers. Written atomically: a killed bootstrap leaves
    no folder that looks finished. Its test metrics are stored in ``bootstrap.json``.
    """
    import torch

    from distill.data import encode_records
    from distill.data.tokenize import train_tokenizer
    from distill.evaluate import evaluate_model
    from distill.trainer import CrossEntropy, train
    from families.hf import build_from_config, param_count, save_model_atomically

    b = tc.bootstrap
    dest = bootstrap_dir(tc, data_hash)
    if (dest / "config.json").is_file() and not force:
        log.info("teacher: reusing cached bootstrap %s", dest)
        return dest
    acc = accelerator
    log.info("teacher: no cached teacher at %s; bootstrapping one (once)", dest)
    texts = [m["content"] for r in data["train"] for m in r["messages"]]
    tokenizer = train_tokenizer(texts, b.vocab_size)
    from transformers import Qwen2Config

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
    train_enc = encode_records(tokenizer, data["train"], max_length, "data.train")
    result = train(
        model,
        tokenizer,
        train_enc,
        b.train,
        accelerator=acc,
        mode=CrossEntropy(BOOTSTRAP_CHUNK_SIZE),
        desc="teacher bootstrap",
        log_prefix="teacher/",
    )
    model = acc.unwrap_model(model)
    info = {
        "key": bootstrap_key(b, data_hash),
        "data_hash": data_hash,
        "settings": dataclasses.asdict(b),
        "num_params": param_count(model),
        "train_seconds": result.seconds,
        "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
    }
    if acc.is_main_process:
        test = encode_records(tokenizer, data["test"][: ec.num_test or None], max_length, "data.test")
        with torch.no_grad():
            scores, _ = evaluate_model(
                model, tokenizer, test, max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size
            )
        info["test"] = scores
        log.info(
            "teacher: bootstrapped %d params in %.0f s; test exact match %.3f",
            info["num_params"],
            result.seconds,
            scores["exact_match"],
        )
        if scores["exact_match"] < b.min_exact_match:
            log.warning(
                "teacher: bootstrapped teacher reaches only %.3f exact match on test (wanted %.2f); "
                "raise teacher.bootstrap.train.steps",
                scores["exact_match"],
                b.min_exact_match,
            )
        save_model_atomically(model, tokenizer, dest, {"bootstrap.json": info})
    acc.wait_for_everyone()
    return dest
