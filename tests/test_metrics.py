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
