"""A finished run's data, as the benchmarks that measure its artifacts read it."""

from __future__ import annotations

from pathlib import Path


def encoded_splits(tokenizer_folder: Path, exp: str, splits: tuple[str, ...]) -> tuple:
    """(the experiment's RunConfig, the tokenizer in ``tokenizer_folder``, split -> encoded examples): the
    experiment's generated data, encoded as the run encoded it."""
    from transformers import AutoTokenizer

    from distill.config import compose
    from distill.data import encode_records, load_records

    rc = compose([f"+exp={exp}"])
    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    return rc, tok, {s: encode_records(tok, load_records(rc.data, s), rc.data.max_length) for s in splits}
