"""Evaluation at real vocabularies: teacher-forced metrics, validation loss and top-k signals form at most
one chunk of (tokens x vocab) logits and give the full-logits numbers; generation batches are formed by
length; ``eval.max_new_tokens: null`` follows the longest reference answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from core.chat import IGNORE, collate


@pytest.fixture(scope="module")
def models_and_data(tokenizer, car_settings):
    from distill.data import encode_records
    from distill.data.car_assistant import generate
    from families.hf import build_from_config

    enc = encode_records(tokenizer, [e.to_record() for e in generate("test", car_settings)[:24]], 128)
    teacher = build_from_config(tiny_config(tokenizer), 0).eval()
    student = build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), 1).eval()
    return teacher, student, enc


def _full_reference(student, teacher, enc, pad_id):
    """The full-logits way: both models' (batch, seq, vocab) logits, then the metrics."""
    b = collate(enc, pad_id)
    sel = b["labels"][:, 1:] != IGNORE
    with torch.no_grad():
        ls = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][sel]
        lt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][sel]
    a, c = F.log_softmax(lt, -1), F.log_softmax(ls, -1)
    return {
        "perplexity": float(F.cross_entropy(ls, b["labels"][:, 1:][sel]).exp()),
        "kl": float((a.exp() * (a - c)).sum()) / ls.shape[0],
        "agreement": float((lt.argmax(-1) == ls.argmax(-1)).float().mean()),
    }


class _RowCounter:
    """Records the largest number of rows the LM head is applied to at once."""

    def __init__(self, *models):
        self.max_rows, self.hooks = 0, []
        for m in models:
            self.hooks.append(m.get_output_embeddings().register_forward_hook(self._hook))

    def _hook(self, module, args, out):
        x = args[0]
        self.max_rows = max(self.max_rows, x.reshape(-1, x.shape[-1]).shape[0])

    def close(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_teacher_forced_metrics_equal_the_full_logits_way_and_hold_one_chunk(models_and_data, tokenizer, chunk):
    from distill.evaluate import teacher_forced

    teacher, student, enc = models_and_data
    want = _full_reference(student, teacher, enc, tokenizer.pad_token_id)
    counter = _RowCounter(teacher, student)
    try:
        got = teacher_forced(student, enc, tokenizer, 8, teacher, chunk)
    finally:
        counter.close()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    srt = sorted(enc, key=lambda e: len(e["input_ids"]))  # batches are formed by length
    per_batch = [sum(1 for e in srt[i : i + 8] for t in e["labels"] if t != IGNORE) for i in range(0, len(srt), 8)]
    assert counter.max_rows <= min(chunk, max(per_batch))  # the head never sees a whole (batch x seq) block


def test_teacher_forced_batches_by_length_and_keeps_the_numbers_of_data_order(models_and_data, tokenizer):
    """Batches of similar lengths pad less (every batch is as wide as its longest example) and give the
    full-logits numbers of the examples in their own order; TopK signals kept this way line up with the
    student scored on the same examples."""
    from distill.evaluate import teacher_forced

    teacher, student, enc = models_and_data
    enc = [enc[i] for i in torch.randperm(len(enc), generator=torch.Generator().manual_seed(0)).tolist()]
    widths = []

    def runtime(ids, mask):
        widths.append(tuple(ids.shape))
        return student(input_ids=ids, attention_mask=mask).logits

    got = teacher_forced(runtime, enc, tokenizer, 8, teacher, chunk_size=10_000)
    lengths = [len(e["input_ids"]) for e in enc]
    srt = sorted(lengths)
    assert sum(r * w for r, w in widths) == sum(
        max(srt[i : i + 8]) * len(srt[i : i + 8]) for i in range(0, len(srt), 8)
    )
    assert sum(r * w for r, w in widths) < sum(max(lengths[i : i + 8]) * 8 for i in range(0, len(lengths), 8))
    want = _full_reference(student, teacher, enc, tokenizer.pad_token_id)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    sig = teacher_forced(teacher, enc, tokenizer, 8, keep_topk=len(tokenizer))["signals"]
    assert teacher_forced(student, enc, tokenizer, 8, sig)["kl"] == pytest.approx(want["kl"], rel=1e-4)


def test_a_runtime_returning_full_logits_is_scored_a_few_rows_at_a_time(models_and_data, tokenizer):
    """An ONNX runner returns (rows, seq, vocab) logits: it is called on as few rows as keep ~chunk tokens,
    and compared with a teacher chunked by tokens, row for row."""
    from distill.evaluate import teacher_forced

    teacher, student, enc = models_and_data
    seen = []

    def runtime(ids, mask):
        seen.append(ids.shape[0])
        return student(input_ids=ids, attention_mask=mask).logits

    want = _full_reference(student, teacher, enc, tokenizer.pad_token_id)
    got = teacher_forced(runtime, enc, tokenizer, 8, teacher, chunk_size=100)
    assert sum(seen) == len(enc) and max(seen) <= 100 // min(len(e["input_ids"]) for e in enc) < 8
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4), k


def test_cached_teacher_topk_gives_the_exact_metrics_when_k_covers_the_vocabulary(models_and_data, tokenizer):
    """eval.kl_topk: the teacher's top-k signals, computed once in its own perplexity pass, replace the
    teacher in every later comparison. k = vocabulary: the exact KL and agreement; a small k: the same
    agreement and a KL below the exact one by no more than the teacher's tail mass allows; signals of
    other data are refused."""
    from distill.evaluate import teacher_forced

    teacher, student, enc = models_and_data
    want = _full_reference(student, teacher, enc, tokenizer.pad_token_id)
    vocab = len(tokenizer)
    own = teacher_forced(teacher, enc, tokenizer, 8, chunk_size=7, keep_topk=vocab)
    assert own["perplexity"] == pytest.approx(teacher_forced(teacher, enc, tokenizer, 8)["perplexity"], rel=1e-6)
    sig = own["signals"]
    assert sig.indices.shape == (sum(t != IGNORE for e in enc for t in e["labels"]), vocab)
    full = teacher_forced(student, enc, tokenizer, 8, sig, chunk_size=7)
    assert full["kl"] == pytest.approx(want["kl"], rel=1e-4)
    assert full["agreement"] == pytest.approx(want["agreement"], rel=1e-6)  # a count; the reference's mean is float32

    small = teacher_forced(teacher, enc, tokenizer, 8, keep_topk=4)["signals"]
    got = teacher_forced(student, enc, tokenizer, 8, small, chunk_size=100)
    assert got["agreement"] == pytest.approx(want["agreement"], rel=1e-6)  # the teacher's argmax is its top-1
    assert got["kl"] <= want["kl"] + 1e-6
    assert got["kl"] < want["kl"]  # a random tiny teacher spreads mass beyond 4 tokens: the bound is not tight
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)

    with pytest.raises(ValueError, match="other data"):
        teacher_forced(student, enc[:-1], tokenizer, 8, sig)


def test_validation_loss_is_chunked_and_exact(models_and_data, tokenizer):
    from distill.train import validation_loss

    _, student, enc = models_and_data
    b = collate(enc, tokenizer.pad_token_id)
    with torch.no_grad():
        want = float(student(**b).loss)
    counter = _RowCounter(student)
    try:
        got = validation_loss(student, tokenizer, enc, 8, chunk_size=5)
    finally:
        counter.close()
    assert got == pytest.approx(want, rel=1e-5) and counter.max_rows <= 5


def test_a_training_probe_generates_only(models_and_data, tokenizer, monkeypatch):
    """The distillation probe's exact match (``train.eval_generate``) is evaluate_model's, from generation
    alone: no teacher-forced pass (perplexity nobody reads there; it made a probe ~1.6x as long)."""
    import dataclasses

    import distill.evaluate
    from distill.config import compose
    from distill.evaluate import evaluate_model
    from distill.train import generated_exact_match

    _, student, enc = models_and_data
    tc = dataclasses.replace(compose(["+exp=smoke"]).distill.train, eval_generate=12, batch_size=4)
    want = evaluate_model(student, tokenizer, enc[:12], max_new_tokens=None, batch_size=8)[0]["exact_match"]

    def no_teacher_forced(*a, **k):
        raise AssertionError("a probe ran a teacher-forced pass")

    monkeypatch.setattr(distill.evaluate, "teacher_forced", no_teacher_forced)
    assert generated_exact_match(student, tokenizer, enc, tc) == want


def test_generation_batches_are_formed_by_length_and_answers_keep_their_order():
    from distill.evaluate import by_length

    prompts = [[1] * n for n in (9, 2, 7, 2, 5, 11)]
    batches = []

    def generate(ps):
        batches.append([len(p) for p in ps])
        return [[len(p)] for p in ps]  # an answer that names its prompt

    assert by_length(prompts, generate) == [[9], [2], [7], [2], [5], [11]]
    assert batches == [sorted(len(p) for p in prompts)]


def test_max_new_tokens_null_follows_the_longest_reference_answer(models_and_data, tokenizer):
    from distill.evaluate import answer_budget, evaluate_model, hf_generate_fn

    _, student, enc = models_and_data
    budget = answer_budget(enc)
    longest = max(len(tokenizer(e["answer"], add_special_tokens=False).input_ids) for e in enc)
    assert budget == longest + 1  # the answer and its end-of-turn token
    lengths = []
    real = hf_generate_fn(student, tokenizer, budget, 8)

    def spy(model, tok, n, bs):
        lengths.append(n)
        return real

    import distill.evaluate as ev

    orig = ev.hf_generate_fn
    ev.hf_generate_fn = spy
    try:
        scores, answers = evaluate_model(student, tokenizer, enc, max_new_tokens=None, batch_size=8)
    finally:
        ev.hf_generate_fn = orig
    assert lengths == [budget] and max(len(a) for a in answers) <= budget
