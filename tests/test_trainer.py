"""The training loop: planted-truth losses, spike guard, checkpoint resume, LoRA, on-policy, multi-process."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, python_env, tiny_config

from distill.config import compose
from distill.data import encode_records, load_records
from distill.train import (
    CrossEntropy,
    DistillModule,
    TrainingDiverged,
    make_accelerator,
    make_mode,
    teacher_signals,
    train,
)
from families import FAMILIES
from families.hf import build_from_config, load_causal_lm


@pytest.fixture(scope="module")
def rc():
    return compose(
        [
            "+exp=smoke",
            "distill.train.steps=6",
            "distill.train.checkpoint_every=0",
            "distill.train.eval_every=0",
            "distill.train.warmup_steps=0",
            "distill.train.batch_size=8",
        ]
    )


@pytest.fixture(scope="module")
def data(rc, tokenizer):
    return encode_records(tokenizer, load_records(rc.data, "train"), 128)


@pytest.fixture(scope="module")
def acc():
    return make_accelerator("no")


def _batch(tokenizer, data, n=4):
    from core.chat import collate

    return collate(data[:n], tokenizer.pad_token_id)


def test_student_equal_to_teacher_has_zero_kd_and_feature_loss(rc, tokenizer, data, teacher_dir):
    """Planted truth: a student that *is* the teacher (with 64 padded vocabulary rows) has zero KD and
    zero hidden-state loss; only the first len(tokenizer) logits are compared."""
    teacher = load_causal_lm(teacher_dir)
    student = copy.deepcopy(teacher)
    student.resize_token_embeddings(len(tokenizer) + 64, mean_resizing=False)
    with torch.no_grad():
        student.get_input_embeddings().weight[len(tokenizer) :] = 100.0  # would dominate if compared
    dc = copy.deepcopy(rc.distill)
    dc.features.weight, dc.features.layer_map, dc.features.attention = 1.0, [[0, 0], [1, 1]], True
    module = DistillModule(student, dc, teacher.config.hidden_size, len(tokenizer), dc.chunk_size)
    assert len(module.proj) == 0  # same width: no projection
    b = _batch(tokenizer, data)
    sig = teacher_signals(teacher, b, module.layer_map, attention=True)
    out = module(b["input_ids"], b["attention_mask"], b["labels"], sig, 1.0, 1.0)
    assert abs(out["kd"].item()) < 1e-4 and abs(out["feat"].item()) < 1e-4
    assert float(out["ce"]) > 0 and int(out["tokens"]) == int((b["labels"][:, 1:] != -100).sum())


def test_narrow_student_gets_projections_and_learns(rc, tokenizer, data, teacher_dir, acc):
    teacher = load_causal_lm(teacher_dir)
    with torch.no_grad():  # a random teacher is near-uniform; sharpen it so there is something to learn
        teacher.lm_head.weight.mul_(20.0)
    student = build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=3)
    dc = copy.deepcopy(rc.distill)
    dc.features.weight, dc.features.layer_map, dc.kd_weight = 0.5, [[0, 0], [1, 1]], 1.0
    tc = copy.deepcopy(dc.train)
    tc.steps, tc.lr = 25, 1e-2
    module = DistillModule(student, dc, teacher.config.hidden_size, len(tokenizer), dc.chunk_size)
    assert set(module.proj) == {"0_0", "1_1"} and module.proj["0_0"].weight.shape == (64, 32)
    result = train(student, tokenizer, data, tc, accelerator=acc, mode=make_mode(dc, teacher=teacher))
    h = result.history

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    assert mean("kd", h[-3:]) < 0.8 * mean("kd", h[:3]) and mean("feat", h[-3:]) < 0.8 * mean("feat", h[:3])
    assert result.skipped_steps == 0 and result.tokens > 0


def _poison(model, bad_calls: set[int] | None):
    """Make the backbone return non-finite hidden states on the given forward calls (None = always)."""
    calls = {"n": 0}

    def hook(_m, _i, out):
        calls["n"] += 1
        if bad_calls is None or calls["n"] in bad_calls:
            out.last_hidden_state = out.last_hidden_state * float("inf")
        return out

    return model.model.register_forward_hook(hook)


def test_spike_guard_skips_non_finite_steps(rc, tokenizer, data, acc):
    student = build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=4)
    handle = _poison(student, {3, 4})
    tc = copy.deepcopy(rc.distill.train)
    tc.steps = 8
    result = train(student, tokenizer, data, tc, accelerator=acc, mode=CrossEntropy(1024))
    handle.remove()
    assert result.skipped_steps == 2 and len(result.history) == 6
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_spike_guard_needs_a_real_rise_not_only_a_ratio(rc):
    """Near the end of distillation the loss is ~0.002: a batch at 6x that is no spike (the SmolLM2 run
    skipped 48 of 500 steps that way); a jump by whole nats still is, at any level."""
    from distill.train import SpikeGuard

    tc = copy.deepcopy(rc.distill.train)
    tc.spike_factor, tc.spike_warmup = 5.0, 0
    guard = SpikeGuard(tc, "t", {"ema": 0.002})
    assert not guard.is_bad(10, 0.012)  # 6x the mean, +0.01 nats
    assert guard.is_bad(10, 0.6)  # +0.6 nats and 300x
    assert guard.is_bad(10, float("nan"))
    guard = SpikeGuard(tc, "t", {"ema": 1.0})
    assert not guard.is_bad(10, 4.9) and guard.is_bad(10, 5.1)  # the ratio decides above ~0.1 nats


@pytest.mark.parametrize("knob", ["split_by_length", "pack"])
def test_less_padding_trains_the_same_examples_to_the_same_weights(knob, rc, tokenizer, data, teacher_dir, acc):
    """train.split_by_length: each batch runs as micro-batches of similar lengths; train.pack: each micro-
    batch's examples share rows (block-diagonal attention, positions from 0). The step's examples and its
    token-mean loss (logit and feature KD, CE) are unchanged, so the weights after training equal the plain
    run's (up to float summation order), while the models see fewer padded positions."""
    teacher = load_causal_lm(teacher_dir)
    tc = copy.deepcopy(rc.distill.train)
    tc.steps, tc.batch_size, tc.grad_accum = 3, 8, 2
    assert rc.distill.features.weight > 0 and rc.distill.features.layer_map  # feature KD runs on packed rows too
    weights, seen = {}, {}
    for on in (False, True):
        tc.split_by_length, tc.pack = (3 if on else 1, False) if knob == "split_by_length" else (1, on)
        student = build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=6)
        positions = []
        hook = student.model.register_forward_pre_hook(
            lambda m, args, kw, out=positions: out.append(kw["input_ids"].numel()), with_kwargs=True
        )
        train(student, tokenizer, data, tc, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher))
        hook.remove()
        weights[on], seen[on] = student.state_dict(), (len(positions), sum(positions))
    assert seen[False][0] == 3 * 2  # micro-batches run: grad_accum per step
    assert seen[True][0] == 3 * (6 if knob == "split_by_length" else 2)
    assert seen[True][1] < seen[False][1]  # fewer padded positions
    for k, v in weights[False].items():
        torch.testing.assert_close(weights[True][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_packed_rows_give_every_example_the_logits_it_has_alone(model_type, tokenizer, data):
    """Planted truth for train.pack: each example's logits inside a packed row equal its logits run alone
    (no attention across examples, positions restart at 0), and the targets are the example's own."""
    from core.chat import IGNORE, collate_packed

    model = build_from_config(tiny_config(tokenizer, model_type=model_type), seed=9).eval()
    by_length = sorted(data[:60], key=lambda e: len(e["input_ids"]))
    examples = [by_length[-1], *by_length[:6]]  # a long example and short ones: the short ones share rows
    packed = collate_packed(examples, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row
    with torch.no_grad():
        rows = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    width, r, s = packed["input_ids"].shape[1], 0, 0
    for i in packed["order"]:  # row-major: an example that does not start here starts the next row
        ex = examples[i]
        k = len(ex["input_ids"])
        if s + k > width or packed["input_ids"][r, s : s + k].tolist() != ex["input_ids"]:
            r, s = r + 1, 0
        assert packed["input_ids"][r, s : s + k].tolist() == ex["input_ids"]
        assert packed["position_ids"][r, s : s + k].tolist() == list(range(k))
        assert packed["labels"][r, s + 1 : s + k].tolist() == ex["labels"][1:] and packed["labels"][r, s] == IGNORE
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0]
        torch.testing.assert_close(rows[r, s : s + k], alone, rtol=1e-4, atol=1e-5)
        s += k


def test_repeated_spikes_stop_with_a_clear_error(rc, tokenizer, data, acc):
    student = build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=4)
    _poison(student, None)
    tc = copy.deepcopy(rc.distill.train)
    tc.steps, tc.max_spikes = 10, 3
    with pytest.raises(TrainingDiverged, match="4 steps in a row"):
        train(student, tokenizer, data, tc, accelerator=acc, mode=CrossEntropy(1024))


def test_checkpoint_resume_equals_uninterrupted(rc, tokenizer, data, teacher_dir, acc, tmp_path):
    teacher = load_causal_lm(teacher_dir)
    tc = copy.deepcopy(rc.distill.train)
    tc.steps, tc.checkpoint_every = 6, 3

    def fresh():
        return build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=5)

    straight = fresh()
    train(straight, tokenizer, data, tc, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher))
    ck = tmp_path / "ck"
    first = fresh()
    train(first, tokenizer, data, tc, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher), checkpoint_dir=ck)
    assert json.loads((ck / "latest.json").read_text())["step"] == 3
    resumed = fresh()  # a new process would start from random init too
    res = train(
        resumed, tokenizer, data, tc, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher), checkpoint_dir=ck
    )
    assert [r["step"] for r in res.history] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoints_of_another_configuration_are_not_resumed(rc, tokenizer, data, teacher_dir, acc, tmp_path):
    """A checkpoint written under key "a" is discarded by a run with key "b": it trains from step 0 and
    ends where an uninterrupted run ends, not where resuming the foreign state would."""
    teacher = load_causal_lm(teacher_dir)
    tc = copy.deepcopy(rc.distill.train)
    tc.steps, tc.checkpoint_every = 6, 3

    def fresh():
        return build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=5)

    ck = tmp_path / "ck"
    other = copy.deepcopy(tc)
    other.lr = tc.lr * 10  # a different configuration's state
    train(
        fresh(),
        tokenizer,
        data,
        other,
        accelerator=acc,
        mode=make_mode(rc.distill, teacher=teacher),
        checkpoint_dir=ck,
        checkpoint_key="a",
    )
    assert json.loads((ck / "latest.json").read_text())["key"] == "a"
    straight = fresh()
    train(straight, tokenizer, data, tc, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher))
    keyed = fresh()
    res = train(
        keyed,
        tokenizer,
        data,
        tc,
        accelerator=acc,
        mode=make_mode(rc.distill, teacher=teacher),
        checkpoint_dir=ck,
        checkpoint_key="b",
    )
    assert [r["step"] for r in res.history] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight.parameters(), keyed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lora_student_is_merged_into_a_plain_model(rc, tokenizer, data, teacher_dir, acc, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill.train import apply_lora, merge_lora
    from families.hf import save_model_atomically

    teacher = load_causal_lm(teacher_dir)
    student = load_causal_lm(teacher_dir)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    lc = copy.deepcopy(rc.student.lora)
    lc.r, lc.alpha = 4, 8
    wrapped = apply_lora(student, lc)
    n_train = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert 0 < n_train < sum(p.numel() for p in wrapped.parameters()) / 5
    tc = copy.deepcopy(rc.distill.train)
    tc.steps, tc.lr = 4, 1e-2
    train(wrapped, tokenizer, data, tc, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher))
    merged = merge_lora(wrapped)
    assert not any("lora" in k for k in merged.state_dict())
    path = save_model_atomically(merged, tokenizer, tmp_path / "lora_student")
    reloaded = AutoModelForCausalLM.from_pretrained(str(path))
    changed = [k for k, v in reloaded.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("q_proj" in k for k in changed)
    assert not any("embed" in k or "norm" in k for k in changed)  # only adapted modules change


def test_on_policy_batches_train_on_the_students_own_samples(rc, tokenizer, data, teacher_dir, acc):
    from core.chat import IGNORE
    from distill.train.modes import sample_on_policy

    teacher = load_causal_lm(teacher_dir)
    student = build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=6)
    b = _batch(tokenizer, data)
    sampled = sample_on_policy(student, b, tokenizer, rc.distill.on_policy)
    for row in range(b["input_ids"].shape[0]):
        n_prompt = int((b["labels"][row] == IGNORE).long().cumprod(0).sum())
        assert torch.equal(sampled["input_ids"][row, :n_prompt], b["input_ids"][row, :n_prompt])
        assert (sampled["labels"][row, :n_prompt] == IGNORE).all()
        assert (sampled["labels"][row, n_prompt:] != IGNORE).sum() >= 1
    dc = copy.deepcopy(rc.distill)
    dc.on_policy.fraction, dc.features.weight = 1.0, 0.0
    tc = copy.deepcopy(dc.train)
    tc.steps = 2
    result = train(student, tokenizer, data, tc, accelerator=acc, mode=make_mode(dc, teacher=teacher))
    for r in result.history:  # on-policy steps: KD only (no reference answer to score CE against)
        assert r["on_policy"] and r["kd"] > 0 and r["loss"] == pytest.approx(r["kd"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_follow_one_process_and_only_rank0_writes(tmp_path):
    """Data parallel on 2 CPU processes (gloo) with batch 4 each == 1 process with batch 8."""
    env = python_env()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    script = str(ROOT / "tests" / "ddp_train.py")
    subprocess.run([sys.executable, script, str(one), "8"], check=True, env=env, timeout=600)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, str(two), "4"],
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 wrote" in proc.stderr and "rank 1 wrote" not in proc.stderr
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert len(h1) == len(h2) == 8
    for a, b in zip(h1, h2, strict=True):
        # stated tolerance: 1e-4 relative (float summation order differs across the all-reduce)
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a["loss"], b["loss"])
    r0, r1 = (json.loads((two / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert math.isclose(r0["param_sum"], r1["param_sum"], rel_tol=1e-9)  # replicas stay in sync
    assert sorted(p.name for p in two.iterdir()) == ["history.json", "rank0.json", "rank1.json", "student"]
    shutil.rmtree(tmp_path)


def test_gradient_accumulation_equals_the_large_batch(rc, tokenizer, data, teacher_dir, acc):
    """batch 4 x 2 accumulation steps == batch 8: the loss is the token mean over the whole step."""
    teacher = load_causal_lm(teacher_dir)
    runs = []
    for bs, accum in ((8, 1), (4, 2)):
        student = build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=7)
        tc = copy.deepcopy(rc.distill.train)
        tc.steps, tc.batch_size, tc.grad_accum = 4, bs, accum
        runs.append(
            (train(student, tokenizer, data, tc, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher)), student)
        )
    (a, sa), (b, sb) = runs
    for x, y in zip(a.history, b.history, strict=True):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5)
    for p, q in zip(sa.parameters(), sb.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_low_precision_teacher_gives_close_signals(quant, teacher_dir, tokenizer, data):
    pytest.importorskip("bitsandbytes")
    full = load_causal_lm(teacher_dir)
    low = load_causal_lm(teacher_dir, quant)
    assert sum(p.numel() * p.element_size() for p in low.parameters()) < sum(
        p.numel() * p.element_size() for p in full.parameters()
    )
    b = _batch(tokenizer, data)
    a, q = teacher_signals(full, b, [], False), teacher_signals(low, b, [], False)
    rel = (a["hidden"] - q["hidden"]).norm() / a["hidden"].norm()
    assert rel < (0.05 if quant == "8bit" else 0.25), float(rel)


def test_pruned_student_meets_the_teacher_at_the_channels_it_kept(rc, tokenizer, data, teacher_dir):
    """Planted truth for ``distill.features.projection=channels``: a teacher whose residual channels
    ``dead`` are exactly zero (never written) is pruned to the others; the pruned student's hidden states
    and attention outputs are the teacher's at the channels the prune report lists, so the feature loss is
    zero. A learned projection, or the right channels in another order, is far from zero."""
    from prune import prune_model

    teacher = load_causal_lm(teacher_dir)
    H, dead = teacher.config.hidden_size, [3, 17, 18, 40, 41, 42, 60, 63]
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, dead] = 0
        for lay in teacher.model.layers:
            lay.self_attn.o_proj.weight[dead] = 0
            lay.mlp.down_proj.weight[dead] = 0
    cal = [_batch(tokenizer, data[i : i + 4]) for i in range(0, 12, 4)]
    student, report = prune_model(teacher, cal, sizes={"hidden_size": H - len(dead)}, align=4)
    kept = report["kept_hidden"]
    assert sorted(kept) == sorted(set(range(H)) - set(dead))
    dc = copy.deepcopy(rc.distill)
    dc.features.weight, dc.features.layer_map, dc.features.attention = 1.0, [[0, 0], [1, 1]], True
    dc.features.projection = "channels"
    b = _batch(tokenizer, data)
    sig = teacher_signals(teacher, b, [(0, 0), (1, 1)], attention=True)

    def feat(module):
        return float(module(b["input_ids"], b["attention_mask"], b["labels"], sig, 1.0, 1.0)["feat"].detach())

    tokens = int((b["labels"][:, 1:] != -100).sum())
    module = DistillModule(student, dc, H, len(tokenizer), dc.chunk_size, kept)
    assert len(module.proj) == 0 and feat(module) / tokens < 1e-5
    shuffled = kept[1:] + kept[:1]
    assert feat(DistillModule(student, dc, H, len(tokenizer), dc.chunk_size, shuffled)) / tokens > 0.1
    dc.features.projection = "learned"
    assert feat(DistillModule(student, dc, H, len(tokenizer), dc.chunk_size)) / tokens > 0.1
    dc.features.projection = "channels"
    with pytest.raises(ValueError, match="needs the 56 teacher channels"):
        DistillModule(student, dc, H, len(tokenizer), dc.chunk_size)


def test_channels_from_a_prune_report_without_them_is_a_clear_error(tmp_path):
    """A folder pruned before reports listed ``kept_hidden``: the error names the folder to prune again."""
    from distill.config import ConfigError
    from distill.stages.student import kept_channels

    (tmp_path / "prune_report.json").write_text(json.dumps({"kept_layers": [0, 1], "kept_hidden": [4, 0, 2]}))
    assert kept_channels(tmp_path) == [4, 0, 2]
    (tmp_path / "prune_report.json").write_text(json.dumps({"kept_layers": [0, 1]}))
    with pytest.raises(ConfigError, match=f"delete {tmp_path} to prune again"):
        kept_channels(tmp_path)
