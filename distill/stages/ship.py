"""Ship: export the student to ONNX, quantize it into every variant, evaluate each under ONNX Runtime (and
OpenVINO), and judge the shipped ones against the teacher (the release gate).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from core.files import building, write_json
from core.hashing import digest
from distill.config import key_settings, openvino_on
from distill.manifest import Stage
from distill.stages.measure import (
    MISSES,
    eval_settings,
    misses,
    teacher_answers,
    teacher_reference,
    teacher_split_answers,
)
from distill.stages.run import EVAL_SPLITS, Run

log = logging.getLogger("distill")


# ---- ship: export -> quantize -> evaluate every ONNX variant -> gate ----


def build_onnx_variants(r: Run, calibration: list[list[int]]) -> dict[str, Stage]:
    """Export the student (fp32, optionally fp16) and quantize it: variant name -> its finished ``Stage``
    (folder ``DIR/onnx/<variant>``). Each folder is a stage (``export``, ``export:fp16``, ``quantize:<v>``)."""
    from export.onnx import export_onnx, resolve_exporter, to_float16
    from families.hf import read_config
    from quantize import SCHEMES, Build

    e, onnx_dir = r.rc.export, r.dir / "onnx"
    out = {}
    keep = kept_tokens(r, read_config(r.dir / "student"))
    trim = {"vocab": dataclasses.asdict(e.vocab)} if keep is not None else {}

    def export_stage(name: str, folder: Path, student: Path, student_hash: str) -> Stage:
        exporter = resolve_exporter(e.exporter, read_config(student), openvino_on(r.rc) and e.deploy_batch > 1)
        return r.stage(
            name,
            folder,
            {
                "exporter": exporter,
                "opset": e.opset,
                "verify_atol": e.verify_atol,
                "verify_rtol": e.verify_rtol,
                **trim,
            },
            {"student_hash": student_hash, **({"kept_tokens": digest(keep)} if keep is not None else {})},
            lambda st: export_onnx(
                student,
                st.folder,
                opset=e.opset,
                verify_atol=e.verify_atol,
                verify_rtol=e.verify_rtol,
                exporter=exporter,
                fallback=e.exporter == "auto",  # auto: a fused graph that fails its checks is exported with dynamo
                keep_tokens=keep,
            ),
            on="main-only",
        )

    out["fp32"] = fp32 = export_stage("export", onnx_dir / "fp32", r.dir / "student", r.student.hash)
    src = {"fp32_hash": fp32.output_hash}
    if e.fp16:
        out["fp16"] = r.stage(
            "export:fp16", onnx_dir / "fp16", {}, src, lambda st: to_float16(fp32.folder, st.folder), on="main-only"
        )
    probe = [ex["input_ids"] for ex in r.teacher.enc["validation"][: r.rc.quantize.probe_examples]]
    for v in r.rc.quantize.variants:
        scheme, settings = SCHEMES[v], getattr(r.rc.quantize, v)
        cal = scheme.calibration(settings, calibration)
        inputs = {**src, **({"calibration": digest(cal)} if cal else {}), **({"probe": digest(probe)} if probe else {})}
        build = {"src": fp32.folder, "settings": settings, "calibration": cal, "probe": probe}
        if scheme.trained:  # quantization-aware distillation: the student trained on the grid, then exported
            student = r.qad[v]  # trained by ``quantization_aware`` on every process, before this main-only section
            base = export_stage(f"export:{v}", r.dir / "qad" / v / "fp32", student.folder, student.output_hash)
            inputs["qad_hash"] = base.output_hash
            qad_info = json.loads((student.folder / "qad_info.json").read_text())
            build.update(src=base.folder, qad=qad_info["summary"], reference=fp32.folder)
        if scheme.needs_student:  # the PyTorch student and answer starts: per-weight sensitivity
            val = r.teacher.enc["validation"][: settings.examples]
            seqs, starts = [ex["input_ids"] for ex in val], [ex["prompt_len"] - 1 for ex in val]
            inputs.update({"student_hash": r.student.hash, "sensitivity_data": digest([seqs, starts])})
            build.update(student=r.dir / "student", sequences=seqs, starts=starts)
        out[v] = r.stage(
            f"quantize:{v}",
            onnx_dir / v,
            key_settings(dataclasses.asdict(settings)),  # (a QAD run from before ``features`` keeps its key)
            inputs,
            lambda st, scheme=scheme, build=build: scheme.build(Build(dest=st.folder, **build)),
            on="main-only",
        )
    return out


def kept_tokens(r: Run, student_config: dict) -> list[int] | None:
    """``export.vocab.trim``: the token ids the exported graphs keep (``export.vocab.choose_tokens``): special
    tokens, every token of the rendered train and validation examples and of the extra pools (teacher-labelled
    augmented requests, general text), and the first ``export.vocab.top`` ids. Never the test or held-out
    splits: they measure what trimming costs. None when trimming is off."""
    from export.vocab import choose_tokens, special_tokens

    v = r.rc.export.vocab
    if not v.trim:
        return None
    seqs = [ex["input_ids"] for split in ("train", "validation") for ex in r.teacher.enc[split]]
    seqs += [ex["input_ids"] for pool in r.pools.examples.values() for ex in pool]
    always = special_tokens(r.teacher.tokenizer)
    keep = choose_tokens(seqs, student_config["vocab_size"], top=v.top, always=always)
    log.info(
        "export.vocab: %d of %d tokens kept (%d in the data, the first %d ids, %d special)",
        len(keep),
        student_config["vocab_size"],
        len({t for s in seqs for t in s}),
        v.top,
        len(always),
    )
    return keep


def ship(r: Run, t_test: dict) -> dict:
    """Export -> quantize -> evaluate every ONNX variant under ONNX Runtime -> release gate.

    Returns the ``metrics.json`` entries: ``onnx_<variant>`` objects (task metrics against the teacher,
    ``bytes``, ``ms_per_token``, ``prefill_ms``, quantization settings, OpenVINO agreement) and ``gate``."""
    from quantize import SCHEMES

    rc = r.rc
    settings = [getattr(rc.quantize, v) for v in SCHEMES]
    n_calib = max(getattr(s, "calib_examples", 0) for s in settings)  # not a knob: schemes without calibration
    calibration = [ex["input_ids"] for ex in r.teacher.enc["train"][:n_calib]]
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
                **(
                    {"openvino_examples": rc.export.openvino_examples, "arithmetic": rc.export.openvino_arithmetic}
                    if ov
                    else {}
                ),
            },
            {
                "model_hash": made.output_hash,
                "teacher_hash": r.teacher.id,
                "teacher_answers": digest([t_answers["answers"], t_answers.get("heldout_answers")]),
                "data_hash": r.data.hash,
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
    ``export.openvino_examples`` of each split (``openvino_match``: the lower share of identical answers, and
    ``openvino_match_n`` the examples it comes from)."""
    import torch

    from core.onnx_files import onnx_bytes
    from distill.evaluate import answer_budget, batch_invariance, evaluate_onnx, latency, onnx_generate_n
    from export.runtime import OnnxCausalLM

    rc, enc = r.rc, r.teacher.enc
    deploy, batch, check = rc.export.deploy_batch, rc.export.deploy_batch, None
    t = teacher_answers(r)
    got, answers, missed = {}, {}, {}
    with torch.no_grad():
        # the job's share of the cores, as torch has it (a joblib launcher splits them between its jobs)
        runner = OnnxCausalLM(folder, threads=torch.get_num_threads())
        if rc.export.invariance_examples and rc.eval.batch_size != deploy:
            # scored at the batch that ships, unless shown not to depend on the batch (then at eval.batch_size)
            sample = enc["test"][: rc.export.invariance_examples]
            budget = rc.eval.max_new_tokens or answer_budget(enc["test"])
            check = batch_invariance(runner, sample, budget, deploy, rc.eval.batch_size, rc.eval.chunk_size)
            batch = rc.eval.batch_size if check["invariant"] else deploy
        settings = {**eval_settings(rc), "batch_size": batch}
        for split in EVAL_SPLITS:
            if enc[split]:
                t_ans = teacher_split_answers(t, split)
                ref = teacher_reference(r, t, split)
                got[split], answers[split] = evaluate_onnx(
                    runner, r.teacher.tokenizer, enc[split], teacher=ref, teacher_answers=t_ans, **settings
                )
                missed[split] = misses(r.teacher.tokenizer, enc[split], answers[split], t_ans)
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
    meta = json.loads((folder / "onnx_config.json").read_text())
    if "vocabulary" in meta:
        scores["vocabulary"] = {k: meta["vocabulary"][k] for k in ("kept", "vocab_size")}
    qinfo = folder / "quantization.json"
    if qinfo.is_file():
        info = json.loads(qinfo.read_text())
        scores["quantization"] = info["settings"]
        if "vs_source" in info:
            scores["vs_fp32"] = info["vs_source"]
        if "vs_fake_quant" in info:  # QAD: the file against the fake-quantized model it was trained as
            scores["vs_fake_quant"] = info["vs_fake_quant"]
    if use_ov:
        checks = []
        for split in answers:
            n_ov = rc.export.openvino_examples or len(enc[split])
            budget = rc.eval.max_new_tokens or answer_budget(enc[split])
            ov = cross_runtime(
                folder,
                runner,
                answers[split][:n_ov],
                enc[split][:n_ov],
                budget,
                deploy,
                rc.eval.chunk_size,
                r.teacher.tokenizer,
                arithmetic=rc.export.openvino_arithmetic,
            )
            (scores if split == "test" else scores[split])["openvino"] = ov
            checks.append(ov)
        if (match := openvino_match(checks)) is not None:
            scores["openvino_match"], scores["openvino_match_n"] = match
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


def openvino_match(checks: list[dict]) -> tuple[float, int] | None:
    """What ``gate.min_openvino_match`` judges: the lowest share of identical answers over the splits'
    OpenVINO checks (``cross_runtime``), each at matched arithmetic where it was measured
    (``export.openvino_arithmetic: matched``), else as shipped, with the number of examples that share comes
    from (the fewer at a tie: the wider error), so the gate can state its 95% error; None unless every split
    was measured (an error: OpenVINO could not load the file)."""
    if not checks or any("generation_match" not in c for c in checks):
        return None
    return min((c.get("matched", c)["generation_match"], c["examples"]) for c in checks)


def cross_runtime(
    folder: Path,
    runner,
    answers,
    data: list[dict],
    max_new_tokens: int,
    batch_size: int,
    chunk_size: int,
    tokenizer=None,
    arithmetic: str = "shipped",
) -> dict:
    """The same ONNX file under OpenVINO (CPU, f32 precision hint) on ``data``: share of greedy answers
    identical to ONNX Runtime's (``answers``: ORT's on the same examples), argmax agreement and largest
    logit difference on the reference sequences, compared a few rows at a time (about ``chunk_size``
    tokens: two runtimes' full logits of a whole split would not fit in memory at a large vocabulary).

    With ``tokenizer``, also each runtime's exact match on these examples (``exact_match`` OpenVINO's,
    ``onnxruntime_exact_match``): whether the answers that differ cost accuracy. For a weight-only file,
    ``activations`` says how each runtime computes its MatMuls' activations on this CPU: where they differ
    (ONNX Runtime int8 at ``accuracy_level`` 4, OpenVINO float on a CPU without VNNI / AMX) the two run
    different arithmetic, and answers at near-ties part (BENCHMARKS.md section 20). There, with
    ``arithmetic="matched"`` (``export.gate.OPENVINO_ARITHMETIC``), ``matched`` holds the same comparison
    against ONNX Runtime running a copy of the file at the ``accuracy_level`` OpenVINO's arithmetic matches
    (``export.runtime.openvino_accuracy_level``): whether the file means the same in both runtimes."""
    import tempfile

    from export.runtime import OnnxCausalLM, openvino_accuracy_level, openvino_quantizes_activations
    from quantize import with_accuracy_level

    try:
        import torch

        ov = OnnxCausalLM(folder, backend="openvino", threads=torch.get_num_threads())
    except Exception as err:  # an op OpenVINO's ONNX frontend lacks: report, do not fail the run
        log.warning("openvino could not load %s: %s", folder, err)
        return {"error": str(err).splitlines()[0][:300]}
    from distill.evaluate import by_length

    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in data]

    def greedy(rt):  # batched as ORT's answers were
        return by_length(prompts, lambda p: rt.generate(p, max_new_tokens, batch_size=batch_size))

    def exact_match(generated) -> float:
        from distill import metrics
        from distill.evaluate import scoring

        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in generated]
        return metrics.score(texts, [ex["answer"] for ex in data], **scoring(data, tokenizer))["exact_match"]

    ov_answers = greedy(ov)
    qinfo = folder / "quantization.json"
    settings = json.loads(qinfo.read_text())["settings"] if qinfo.is_file() else {}
    acts = None
    if "accuracy_level" in settings:  # MatMulNBits weight-only: level 4 = int8 activations; 0-3, null: float
        acts = {
            "onnxruntime": "int8" if settings["accuracy_level"] == 4 else "float",
            "openvino": "int8" if openvino_quantizes_activations() else "float",
        }
    with tempfile.TemporaryDirectory(prefix="matched-") as tmp:
        runs = [(runner, answers)]  # ONNX Runtime as shipped, then (matched) at OpenVINO's arithmetic
        if arithmetic == "matched" and acts and acts["onnxruntime"] != acts["openvino"]:
            level = openvino_accuracy_level()
            with_accuracy_level(folder, Path(tmp) / folder.name, level)
            matched = OnnxCausalLM(Path(tmp) / folder.name, threads=torch.get_num_threads())
            runs.append((matched, greedy(matched)))
        logits = _logit_agreement(ov, [rt for rt, _ in runs], [ex["input_ids"] for ex in data], batch_size, chunk_size)
    rows = []
    for (_, ort_answers), agree in zip(runs, logits, strict=True):
        same = sum(x == y for x, y in zip(ort_answers, ov_answers, strict=True)) / max(len(ort_answers), 1)
        row = {"generation_match": same, **agree}
        if tokenizer is not None and data:
            row["onnxruntime_exact_match"] = exact_match(ort_answers)
        rows.append(row)
    out = {"examples": len(data), **rows[0]}
    if tokenizer is not None and data:
        out["exact_match"] = exact_match(ov_answers)
    if acts:
        out["activations"] = acts
    if len(rows) > 1:
        out["matched"] = {
            "accuracy_level": level,
            **rows[1],
            **({"exact_match": out["exact_match"]} if "exact_match" in out else {}),
        }
    return out


def _logit_agreement(ref, runners: list, seqs: list, batch_size: int, chunk_size: int) -> list[dict]:
    """Argmax agreement and largest logit difference of each of ``runners`` against ``ref`` on the
    teacher-forced ``seqs``, a few rows at a time (about ``chunk_size`` tokens); ``ref`` runs each chunk once."""
    import numpy as np

    seqs = sorted(seqs, key=len)
    same, total, diff = [0] * len(runners), 0, [0.0] * len(runners)
    start = 0
    while start < len(seqs):
        rows = 1  # as many rows as keep the chunk within chunk_size tokens (rows grow longer: sorted)
        while rows < batch_size and start + rows < len(seqs) and len(seqs[start + rows]) * (rows + 1) <= chunk_size:
            rows += 1
        part = seqs[start : start + rows]
        want = ref.sequence_logits(part, rows)
        total += sum(y.shape[0] for y in want)
        for i, rt in enumerate(runners):
            for x, y in zip(rt.sequence_logits(part, rows), want, strict=True):
                same[i] += int((x.argmax(-1) == y.argmax(-1)).sum())
                diff[i] = max(diff[i], float(np.abs(x - y).max()))
        start += rows
    return [{"argmax_agreement": s / max(total, 1), "max_logit_diff": d} for s, d in zip(same, diff, strict=True)]
