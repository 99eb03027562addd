from distill import metrics


def test_parse_and_score():
    ref = '{"tool":"set_temperature","args":{"zone":"driver","value":22,"unit":"celsius"}}'
    same_other_order = '{"args":{"unit":"celsius","value":22,"zone":"driver"},"tool":"set_temperature"}'
    wrong_value = '{"tool":"set_temperature","args":{"zone":"driver","value":23,"unit":"celsius"}}'
    wrong_tool = '{"tool":"set_fan_speed","args":{"level":2}}'
    broken = '{"tool":"set_temperature","args":{"zone":"dri'
    s = metrics.score([ref, same_other_order, wrong_value, wrong_tool, broken], [ref] * 5)
    assert s["exact_match"] == 2 / 5
    assert s["tool_accuracy"] == 3 / 5
    assert s["valid_json"] == 4 / 5
    # arg F1: 1, 1, 2/3 (2 of 3 pairs), 0, 0
    assert abs(s["arg_f1"] - (1 + 1 + 2 / 3) / 5) < 1e-9


def test_free_text_reference_and_helpers():
    assert metrics.score(["hello "], ["hello"])["exact_match"] == 1.0
    assert metrics.parse_tool_call("[1,2]") is None
    refuse = [{"name": "refuse", "arguments": {}}]
    assert metrics.arg_f1(refuse, refuse) == 1.0 and metrics.arg_f1([], refuse) == 0.0
    assert abs(metrics.perplexity(0.0, 10) - 1.0) < 1e-12
    assert metrics.sequence_match([[1, 2], [3]], [[1, 2], [4]]) == 0.5


def test_free_text_data_gets_text_metrics_only():
    s = metrics.score(
        ["Calling  Alice now.", "调到二十二度", "Navigating home", "sure"],
        ["calling alice now", "调到二十度", "Navigating to the office", "Sure!"],
    )
    assert set(s) == {"exact_match", "token_f1"}  # no tool-call metric on data that has no tool calls
    assert s["exact_match"] == 2 / 4  # case, spacing and end punctuation do not count
    # token F1: 1; CJK by character: 5 of 6 predicted in the reference, all 5 of the reference -> 10/11;
    # 1 of 2 vs 1 of 4 -> 1/3; 1
    assert abs(s["token_f1"] - (1 + 10 / 11 + 1 / 3 + 1) / 4) < 1e-9


def test_mixed_data_measures_tool_metrics_over_the_tool_call_examples():
    call = '{"tool":"call_contact","args":{"name":"Alice"}}'
    s = metrics.score([call, "not json", "Sure."], [call, call, "sure"])
    assert s["exact_match"] == 2 / 3 and s["valid_json"] == 1 / 2 and s["tool_accuracy"] == 1 / 2

    def recs(*answers):
        return [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]} for a in answers]

    assert metrics.has_tool_calls(recs(call, "x")) and not metrics.has_tool_calls(recs("x", "[1]"))
    structured = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    assert metrics.has_tool_calls([{"messages": [{"role": "user", "content": "q"}, structured]}])


def test_metrics_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, distill.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _fake_run(folder, misses: dict, data_hash="d1", num_test=200):
    import json

    (folder / "eval" / "pytorch").mkdir(parents=True)
    metrics_ = {
        "data_hash": data_hash,
        "teacher": {"exact_match": 0.9, "heldout": {"exact_match": 0.7}},
        "student": {"exact_match": 0.8, "heldout": {"exact_match": 0.5}},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics_))
    (folder / "config.yaml").write_text(f"eval:\n  num_test: {num_test}\n")
    (folder / "eval" / "pytorch" / "misses.json").write_text(json.dumps(misses))
    return folder


def test_compare_pairs_the_same_examples_with_mcnemar(tmp_path):
    """``distill.compare`` pairs two runs' misses on the same examples: planted, A misses requests 1-3 and
    B misses 3-14 on test (B lost 11, gained 2); McNemar's exact p matches a brute-force count over every
    way 13 discordant examples can fall; runs on other data are not paired."""
    import itertools

    from distill.compare import compare, load_run, mcnemar_p, render

    def miss(i):
        return {"request": f"call contact {i}", "reference": {"tool": "call", "args": {"n": i}}, "answer": "x"}

    a = _fake_run(tmp_path / "a", {"test": [miss(i) for i in (1, 2, 3)], "heldout": [miss(50)]})
    b = _fake_run(tmp_path / "b", {"test": [miss(i) for i in range(3, 15)], "heldout": [miss(50)]})
    c = compare(load_run(a), load_run(b))
    got = c["paired"]["student"]
    brute = sum(abs(2 * sum(s) - 13) >= 9 for s in itertools.product((0, 1), repeat=13)) / 2**13
    assert (got["test"]["lost"], got["test"]["gained"]) == (11, 2)
    assert abs(got["test"]["p"] - brute) < 1e-12 and abs(brute - 0.0224609375) < 1e-12
    assert got["heldout"] == {"lost": 0, "gained": 0, "p": 1.0}
    assert mcnemar_p(2, 11) == mcnemar_p(11, 2) and mcnemar_p(3, 2) == 1.0
    text = render(c)
    assert "student        test     lost   11  gained    2  McNemar p = 0.0225" in text
    # a regression the paired test cannot tell from chance says so
    b2 = _fake_run(tmp_path / "b2", {"test": [miss(i) for i in (1, 2, 3, 4, 5)], "heldout": []})
    (b2 / "metrics.json").write_text(
        (b2 / "metrics.json").read_text().replace('"exact_match": 0.8', '"exact_match": 0.78')
    )
    (reg,) = compare(load_run(a), load_run(b2))["regressions"]
    assert reg.startswith("student.exact_match: 0.8 -> 0.78 (paired: 2 lost, 0 gained, McNemar p = 0.5: possibly")
    # runs scored on other examples are not paired
    other = _fake_run(tmp_path / "other", {"test": []}, data_hash="d2")
    c = compare(load_run(a), load_run(other))
    assert c["paired"] == {} and "data differ" in c["paired_note"] and "data differ" in render(c)
    fewer = _fake_run(tmp_path / "fewer", {"test": []}, num_test=100)
    c = compare(load_run(a), load_run(fewer))
    assert c["paired"] == {} and "eval.num_test differs (200 -> 100)" in c["paired_note"]


def test_report_lists_each_splits_cross_runtime_check_and_names_a_differing_arithmetic():
    """The release report's OpenVINO table: a row per variant and split with both runtimes' exact match
    (planted, distinct), and the note on differing activation arithmetic only where it differs."""
    from distill.report import release_table

    def ov(match, ort_em, ov_em, acts):
        o = {"examples": 200, "generation_match": match, "argmax_agreement": 0.96, "max_logit_diff": 2.0}
        return {**o, "onnxruntime_exact_match": ort_em, "exact_match": ov_em, **({"activations": acts} if acts else {})}

    base = {"gate": {"checks": [], "summary": "gate\n- ok", "passed": True}, "teacher": {}, "student": {}}
    int8_float = {"onnxruntime": "int8", "openvino": "float"}
    metrics = {
        **base,
        "onnx_fp32": {"openvino": ov(1.0, 0.945, 0.945, None)},
        "onnx_int4_qad": {
            "openvino": ov(0.99, 0.96, 0.955, int8_float),
            "heldout": {"openvino": ov(0.925, 0.435, 0.44, int8_float)},
        },
    }
    text = "\n".join(release_table(metrics))
    assert "| int4_qad | heldout | 0.925 (200) | 0.435 / 0.440 | int8 / float |" in text
    assert "| int4_qad | test | 0.990 (200) | 0.960 / 0.955 | int8 / float |" in text
    assert "| fp32 | test | 1.000 (200) | 0.945 / 0.945 |  |" in text
    assert "accuracy_level: 1 makes them compute alike here" in text
    assert "judges the answers as shipped" in text
    # export.openvino_arithmetic: matched: each row also shows the comparison at OpenVINO's arithmetic
    matched = {"accuracy_level": 1, "generation_match": 0.995, "max_logit_diff": 2e-4}
    metrics["onnx_int4_qad"]["heldout"]["openvino"]["matched"] = matched
    text = "\n".join(release_table(metrics))
    assert "| heldout | 0.925 (200) | 0.435 / 0.440 | int8 / float | 0.9600 | 2.00e+00 | 0.995 (ORT at" in text
    assert "accuracy_level 1; max logit diff 2.0e-04) |" in text
    assert "judges the answers at matched arithmetic" in text
    alike = {"onnxruntime": "int8", "openvino": "int8"}
    metrics["onnx_int4_qad"]["openvino"]["activations"] = alike
    metrics["onnx_int4_qad"]["heldout"]["openvino"]["activations"] = alike
    assert "compute the activations differently" not in "\n".join(release_table(metrics))
