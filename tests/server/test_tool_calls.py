"""Tool calls in generated replies (``deltamem_agents.engine.tool_calls``): the two parsers on odd inputs, the
streaming view (settled content) against the whole-reply parse on every split, format detection on real models'
chat templates, tool definitions reaching the online prompt, the canonical ``tool_calls`` of messages, and the
engine writing a reply with calls so that the client's resent copy is recognised (no replay)."""

from __future__ import annotations

import json
import random

import pytest
from tool_helpers import (
    ADD_TOOL,
    LLAMA31,
    LLAMA32,
    MISTRAL_NEMO,
    QWEN3,
    QWEN25,
    WEATHER_TOOL,
    script_replies,
    template,
    with_template,
)

from deltamem_agents.engine.errors import HistoryConflictError, InvalidMessageError
from deltamem_agents.engine.messages import normalize_message
from deltamem_agents.engine.tool_calls import (
    HermesFormat,
    LlamaJsonFormat,
    ParsedReply,
    detect_tool_format,
    tool_names,
)

TOOLS = [WEATHER_TOOL, ADD_TOOL]
HERMES = HermesFormat()
LLAMA = LlamaJsonFormat()


def calls_of(parsed: ParsedReply) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


# ---------------------------------------------------------------------------------------------- Hermes
def test_hermes_one_call_and_text_before():
    parsed = HERMES.parse('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                          "</tool_call>", TOOLS)
    assert parsed.content == "Let me check."
    assert calls_of(parsed) == [("get_weather", {"city": "Paris"})]
    call = parsed.tool_calls[0]
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.to_openai() == {"id": call.id, "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_hermes_several_calls_with_text_between_and_after():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n and then \n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\nDone. ')
    parsed = HERMES.parse(text, TOOLS)
    assert calls_of(parsed) == [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]
    assert parsed.content == "and then\nDone."
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_hermes_nested_json_and_markers_inside_strings():
    args = {"query": {"filters": [{"field": "a}", "op": "<tool_call>"}, {"nested": {"deep": [1, [2, {"x": None}]]}}]},
            "note": "ends with </tool_call> inside a string"}
    text = "<tool_call>" + json.dumps({"name": "get_weather", "arguments": args}) + "</tool_call>"
    parsed = HERMES.parse(text, TOOLS)
    assert calls_of(parsed) == [("get_weather", args)] and parsed.content is None


def test_hermes_rejects_unknown_tools_and_broken_json_as_text():
    for text in [
        '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',  # not offered
        '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>',  # broken JSON
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "add", "arguments": "not json"}</tool_call>',
        '<tool_call>["add", {"a": 1}]</tool_call>',
        '<tool_call>{"name": "add", "arguments": {}} trailing</tool_call>',  # something after the JSON
        '<tool_call>{"name": "add", "arguments": {"a": 1}',  # cut before the JSON ended
        "<tool_call>",
        "</tool_call> stray closing tag",
    ]:
        parsed = HERMES.parse(text, TOOLS)
        assert parsed == ParsedReply(text), text  # unchanged text, no calls


def test_hermes_mixed_valid_and_invalid_blocks():
    text = ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    parsed = HERMES.parse(text, TOOLS)
    assert calls_of(parsed) == [("add", {"a": 1})]
    assert parsed.content == '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'  # the rejected block is text


def test_hermes_lenient_forms():
    # arguments as a JSON string, "parameters" instead of "arguments", no arguments, a missing closing tag at the end
    assert calls_of(HERMES.parse('<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>', TOOLS)) == [
        ("add", {"a": 3})]
    assert calls_of(HERMES.parse('<tool_call>{"name": "add", "parameters": {"b": 4}}</tool_call>', TOOLS)) == [
        ("add", {"b": 4})]
    assert calls_of(HERMES.parse('<tool_call>{"name": "add"}</tool_call>', TOOLS)) == [("add", {})]
    assert calls_of(HERMES.parse('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n', TOOLS)) == [("add", {"a": 1})]


def test_no_tools_means_no_calls():
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call>'
    assert HERMES.parse(text, None) == ParsedReply(text)
    assert HERMES.parse(text, []) == ParsedReply(text)
    assert LLAMA.parse('{"name": "add", "parameters": {}}', None).tool_calls == ()


def test_plain_text_is_unchanged():
    for text in ["", "  Hello there.  \n", "a < b and c > d", "<tool", "use <tool_call> tags like this"]:
        assert HERMES.parse(text, TOOLS) == ParsedReply(text)
        assert LLAMA.parse(text, TOOLS) == ParsedReply(text)


def test_tool_names_of_each_shape():
    def local_fn(x: int) -> int:
        return x

    assert tool_names([WEATHER_TOOL, {"name": "flat"}, local_fn, {"type": "function"}, 3]) == {
        "get_weather", "flat", "local_fn"}


# ---------------------------------------------------------------------------------------------- Llama 3 JSON
def test_llama_whole_reply_is_the_call():
    assert calls_of(LLAMA.parse('{"name": "get_weather", "parameters": {"city": "Rome"}}', TOOLS)) == [
        ("get_weather", {"city": "Rome"})]
    parsed = LLAMA.parse('  <|python_tag|>{"name": "add", "parameters": {"a": {"nested": [1, 2]}}}\n', TOOLS)
    assert calls_of(parsed) == [("add", {"a": {"nested": [1, 2]}})] and parsed.content is None


def test_llama_several_calls_and_arguments_key():
    parsed = LLAMA.parse('{"name": "add", "parameters": {"a": 1}}; {"name": "get_weather", "arguments": {"city": '
                         '"X"}}', TOOLS)
    assert calls_of(parsed) == [("add", {"a": 1}), ("get_weather", {"city": "X"})]


def test_llama_anything_else_is_text():
    for text in [
        'Sure: {"name": "add", "parameters": {}}',  # text before
        '{"name": "add", "parameters": {}} and more',  # text after
        '{"name": "unknown", "parameters": {}}',
        '{"answer": 42}',  # JSON, not a call
        '{"name": "add", "parameters": {"a": 1}',  # cut
        '{"name": "add", "parameters": {}}; {"name": "unknown", "parameters": {}}',  # one bad call: all text
        "[1, 2, 3]",
    ]:
        assert LLAMA.parse(text, TOOLS) == ParsedReply(text), text


# ---------------------------------------------------------------------------------------------- streaming view
STREAM_CASES = [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    (HERMES, '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name": "add", '
             '"arguments": {"b": "}</tool_call>"}}</tool_call> ok then'),
    (HERMES, 'Hi <tool_call>{"name": "nope", "arguments": {}}</tool_call> <tool_call>{"name": "add", "arguments": '
             '{"a": 1,}}</tool_call> end  '),
    (HERMES, 'x <tool_call>{"name": "add", "arguments": {"s": "unterminated </tool_call> ... "}}</tool_call>'),
    (HERMES, "a <tool_c b <tool_call>{tr</tool_call> <tool_call>{\"name\": \"add\", \"arguments\": {\"n\": -1e5}}"),
    (HERMES, "  plain text with trailing spaces   "),
    (LLAMA, '<|python_tag|>{"name": "add", "parameters": {"a": 1}}'),
    (LLAMA, '{"name": "add", "parameters": {"a": 1}} not a call after all'),
    (LLAMA, "<|py but plain text"),
    (LLAMA, "  The answer is 4."),
]


def final_content(fmt, text):
    parsed = fmt.parse(text, TOOLS)
    return parsed.content or ""


@pytest.mark.parametrize("fmt,text", STREAM_CASES)
def test_settled_content_is_a_growing_prefix_of_the_final_content(fmt, text):
    """At every prefix of the reply, what a stream may send is final: it only grows, and the whole reply's
    content starts with it — so a call, or part of its opening tag, is never sent as text."""
    final = final_content(fmt, text)
    previous = ""
    for end in range(len(text) + 1):
        settled = fmt.settled_content(text[:end], TOOLS)
        assert settled.startswith(previous), (end, previous, settled)
        assert final.startswith(settled), (end, settled, final)
        previous = settled


@pytest.mark.parametrize("fmt,text", STREAM_CASES)
def test_chunked_stream_sends_exactly_the_final_content(fmt, text):
    """What the server's stream sends (settled deltas, then the rest at the end) equals the non-streamed content,
    for random chunkings of the reply."""
    rng = random.Random(len(text))
    for _ in range(20):
        sent, acc, pos = "", "", 0
        while pos < len(text):
            step = rng.randint(1, 7)
            acc += text[pos : pos + step]
            pos += step
            settled = fmt.settled_content(acc, TOOLS)
            assert settled.startswith(sent)
            sent = settled
        final = final_content(fmt, text)
        assert final.startswith(sent)


# ---------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name,expected", [
    (QWEN25, "hermes"), (QWEN3, "hermes"), (LLAMA31, "llama3_json"), (LLAMA32, "llama3_json"), (MISTRAL_NEMO, None),
])  # fmt: skip
def test_format_detected_from_real_templates(tokenizer, name, expected):
    fmt = detect_tool_format(with_template(tokenizer, name))
    assert (fmt.name if fmt else None) == expected


def test_embedded_smollm2_template_has_no_format(tokenizer):
    assert detect_tool_format(tokenizer) is None


def test_template_that_only_describes_the_tags_is_hermes(tokenizer):
    """Like SmolLM3's template: the system prompt asks for <tool_call> blocks, past calls are not rendered."""
    tok = with_template(tokenizer, QWEN25)
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\nCall tools as <tool_call>{\"name\": …, \"arguments\": …}</tool_call>"
        "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert isinstance(detect_tool_format(tok), HermesFormat)


def test_named_templates_use_the_tool_use_one(tokenizer):
    tok = with_template(tokenizer, QWEN25)
    tok.chat_template = {"default": tokenizer.chat_template, "tool_use": template(QWEN3)}
    assert isinstance(detect_tool_format(tok), HermesFormat)


# ---------------------------------------------------------------------------------------------- tools in the prompt
@pytest.mark.parametrize("name", [QWEN25, QWEN3, LLAMA31, LLAMA32])
@pytest.mark.parametrize("first", [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
    [{"role": "tool", "content": "sunny", "tool_call_id": "call_1"}],
])  # fmt: skip
def test_tool_definitions_reach_the_online_prompt(tokenizer, name, first):
    """Online mode renders each message on its own after a head; templates that write the tools *into* the
    first message (Qwen: a leading system message; Llama 3: the first user message) still get them in the head."""
    from deltamem_agents.engine.messages import normalize_messages
    from deltamem_agents.engine.rendering import ChatRenderer

    tok = with_template(tokenizer, name)
    renderer = ChatRenderer(tok)
    msgs = normalize_messages(first)
    head = tok.decode(renderer.continuation_ids([], msgs, tools=TOOLS))
    assert "get_weather" in head and "add" in head
    assert "get_weather" not in tok.decode(renderer.continuation_ids([], msgs))


def test_head_unchanged_where_the_template_keeps_messages_apart(tokenizer):
    """Qwen before a user message: the head is exactly what the template renders before it."""
    from deltamem_agents.engine.messages import normalize_messages
    from deltamem_agents.engine.rendering import ChatRenderer

    tok = with_template(tokenizer, QWEN25)
    renderer = ChatRenderer(tok)
    msgs = normalize_messages([{"role": "user", "content": "hi"}])
    whole = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS, tokenize=False)
    own = renderer.message_text(msgs[0])
    assert tok.decode(renderer.continuation_ids([], msgs, tools=TOOLS)) == whole[: -len(own)]


# ---------------------------------------------------------------------------------------------- messages
def test_resent_tool_calls_have_one_canonical_form():
    ours = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    compact = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "index": 0,
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    langchain_style = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "name": "get_weather", "args": {"city": "Paris"}, "type": "tool_call"}]}
    digests = {normalize_message(m).digest for m in (ours, compact, langchain_style)}
    assert len(digests) == 1
    other_id = {**ours, "tool_calls": [{**ours["tool_calls"][0], "id": "call_2"}]}
    assert normalize_message(other_id).digest not in digests
    rendered = normalize_message(ours).to_template()["tool_calls"]
    assert rendered == [{"type": "function", "id": "call_1",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def test_templates_render_canonical_calls_without_double_encoding(tokenizer):
    from deltamem_agents.engine.rendering import ChatRenderer

    message = normalize_message({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]})
    qwen = ChatRenderer(with_template(tokenizer, QWEN25)).message_text(message)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in qwen
    llama = ChatRenderer(with_template(tokenizer, LLAMA31)).message_text(message)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in llama


def test_malformed_tool_calls_are_refused():
    for calls in ["call it", [{"function": {"arguments": "{}"}}], [3]]:
        with pytest.raises(InvalidMessageError, match="tool_calls"):
            normalize_message({"role": "assistant", "content": "", "tool_calls": calls})


# ---------------------------------------------------------------------------------------------- engine
def _engine(tiny_dm, tokenizer, name, **kwargs):
    from deltamem_agents.engine import MemoryEngine, SamplingParams
    from deltamem_agents.store.memory import InMemorySessionStore

    kwargs.setdefault("max_new_tokens", 12)
    return MemoryEngine((tiny_dm, with_template(tokenizer, name)), store=InMemorySessionStore(),
                        sampling=SamplingParams(temperature=0.0), **kwargs)


CALL_REPLY = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("mode", ["online", "windowed"])
def test_engine_writes_the_call_so_the_resent_history_is_recognised(tiny_dm, tokenizer, monkeypatch, mode):
    """Turn 1 answers with a call; the client resends it in OpenAI's shape (content null, arguments a JSON
    string, as the server sent it) with the tool's result: turn 2 continues without a replay (online: on the hot
    KV cache) and writes only the tool result and the new reply."""
    script_replies(monkeypatch, [CALL_REPLY, "It is sunny in Paris."])
    engine = _engine(tiny_dm, tokenizer, QWEN25, mode=mode)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    first = engine.chat("s", history, tools=TOOLS, history="full")
    assert first.finish_reason == "tool_calls" and first.content == "Checking." and first.text == CALL_REPLY
    assert [(c.name, c.args) for c in first.tool_calls] == [("get_weather", {"city": "Paris"})]

    history += [{"role": "assistant", "content": first.content, "tool_calls": [c.to_openai() for c in first.tool_calls]},
                {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 24 C"}]
    second = engine.chat("s", history, tools=TOOLS, history="full")
    assert not second.replayed and second.written_messages == 2
    assert second.finish_reason == "stop" and second.tool_calls == () and second.content == second.text
    if mode == "online":
        assert second.kv_cache == "hot"
    assert engine.get_session("s").turn == 2


def test_engine_control_a_changed_call_is_a_replay(tiny_dm, tokenizer, monkeypatch):
    """The control of the test above: resending the call with other arguments (or as raw text) is an edit."""
    script_replies(monkeypatch, [CALL_REPLY, "ok", "ok"])
    engine = _engine(tiny_dm, tokenizer, QWEN25)
    history = [{"role": "user", "content": "Weather in Paris?"}]
    first = engine.chat("s", history, tools=TOOLS, history="full")
    call = first.tool_calls[0].to_openai()
    call["function"]["arguments"] = '{"city": "Lyon"}'
    resent = [*history, {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
              {"role": "tool", "content": "rain"}]
    with pytest.raises(HistoryConflictError):  # an edit is a conflict unless the caller asks for a rollback
        engine.chat("s", resent, tools=TOOLS, history="full")
    edited = engine.chat("s", resent, tools=TOOLS, history="full", on_divergence="rollback")
    assert edited.replayed


def test_engine_llama_json_call(tiny_dm, tokenizer, monkeypatch):
    script_replies(monkeypatch, ['<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}', "5"])
    engine = _engine(tiny_dm, tokenizer, LLAMA31)
    history = [{"role": "user", "content": "2+3?"}]
    first = engine.chat("s", history, tools=TOOLS, history="full")
    assert first.content is None and [(c.name, c.args) for c in first.tool_calls] == [("add", {"a": 2, "b": 3})]
    history += [{"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in first.tool_calls]},
                {"role": "tool", "content": "5"}]
    second = engine.chat("s", history, tools=TOOLS, history="full")
    assert not second.replayed and second.kv_cache == "hot"


def test_engine_parses_only_with_tools_and_a_format(tiny_dm, tokenizer, monkeypatch):
    script_replies(monkeypatch, [CALL_REPLY, CALL_REPLY])
    without_tools = _engine(tiny_dm, tokenizer, QWEN25).chat("s", "hi")
    assert without_tools.text == CALL_REPLY and without_tools.tool_calls == () and without_tools.finish_reason == "stop"
    from deltamem_agents.engine import MemoryEngine, SamplingParams
    from deltamem_agents.store.memory import InMemorySessionStore

    smollm2 = MemoryEngine((tiny_dm, tokenizer), store=InMemorySessionStore(), sampling=SamplingParams(temperature=0),
                           max_new_tokens=12)
    assert smollm2.tool_call_format is None
    assert smollm2.chat("s", "hi", tools=TOOLS).tool_calls == ()
