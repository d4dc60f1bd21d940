"""Tool calls in a generated reply: which format the chat template asks for, and parsing it out of the text.

A model asks for a tool in the format its chat template taught it. Two formats are understood:

* :class:`HermesFormat` (Hermes, Qwen2.5, Qwen3, QwQ): each call is a JSON object
  ``{"name": …, "arguments": {…}}`` between ``<tool_call>`` and ``</tool_call>``, anywhere in the reply, several
  per reply, with text before, between or after them.
* :class:`LlamaJsonFormat` (Llama 3.1, 3.2, 3.3): the **whole** reply is the call, ``{"name": …,
  "parameters": {…}}`` (optionally after ``<|python_tag|>``; several calls separated by ``;``).

:func:`detect_tool_format` picks one from the chat template: it renders an assistant message holding a probe
call and looks at how the template wrote it (``<tool_call>`` tags, or a bare ``"parameters"`` object); a template
that does not render assistant calls but asks for ``<tool_call>`` tags in its instructions (as SmolLM3's is
described) is Hermes too. A template with neither (SmolLM2, the embedded model) has no format: its replies are
never parsed.

Only a well-formed call of an offered tool counts (a JSON object whose ``name`` is one of the request's tools
and whose arguments are an object); anything else — unknown tool, broken JSON, a truncated call — stays text.

**Content.** Without a valid call the reply's text is the content, unchanged. With calls, the content is the text
outside them, each piece stripped where it touches a call or the end, the non-empty pieces joined by ``"\\n"``
(``None`` when nothing is left). :meth:`ToolCallFormat.settled_content` gives, for a reply still being generated,
the part of that content that no continuation can change; a stream emits it as it grows (so no half marker
or half call is ever sent as text), and the finished reply's content always starts with it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "HermesFormat",
    "LlamaJsonFormat",
    "ParsedReply",
    "ToolCall",
    "ToolCallFormat",
    "detect_tool_format",
    "new_call_id",
    "tool_names",
]


def new_call_id() -> str:
    """An OpenAI-style tool call id, ``call_`` + 24 hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call. ``arguments`` is the JSON text of the arguments object (as OpenAI sends it)."""

    id: str
    name: str
    arguments: str

    @property
    def args(self) -> dict[str, Any]:
        """The arguments as a dict."""
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments"}}``: a chat message's ``tool_calls`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into ``content`` (the text outside the calls; ``None`` when only calls) and ``tool_calls``."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


def tool_names(tools: Iterable[Any] | None) -> frozenset[str]:
    """The function names of a ``tools`` list: OpenAI's ``{"type": "function", "function": {"name"}}``, a bare
    ``{"name"}`` schema, or a Python function (as transformers' templates accept them)."""
    names = set()
    for tool in tools or ():
        if isinstance(tool, Mapping):
            fn = tool.get("function", tool)
            name = fn.get("name") if isinstance(fn, Mapping) else None
        else:
            name = getattr(tool, "__name__", None)
        if isinstance(name, str) and name:
            names.add(name)
    return frozenset(names)


# Scan results: decided pieces in order, each ("text", str) or ("call", name, args); ``pending`` says that the
# text after them is undecided (a call may be forming there).
_Piece = tuple[Any, ...]


class ToolCallFormat:
    """How one family of models writes tool calls. Subclasses implement :meth:`_scan`."""

    name: ClassVar[str]

    def parse(self, text: str, tools: Iterable[Any] | None, *,
              make_id: Callable[[], str] = new_call_id) -> ParsedReply:
        """Split a finished reply. ``tools`` are the request's tool definitions (only their names matter)."""
        pieces, _ = self._scan(text, tool_names(tools), final=True)
        calls = tuple(ToolCall(make_id(), p[1], json.dumps(p[2], ensure_ascii=False)) for p in pieces if p[0] == "call")
        if not calls:
            return ParsedReply(text)
        return ParsedReply(_content(pieces, final=True) or None, calls)

    def settled_content(self, text: str, tools: Iterable[Any] | None) -> str:
        """For a reply still being generated (``text`` so far): the part of its content that is final. The
        finished reply's content (or text, without calls) starts with it, however the reply continues."""
        pieces, _ = self._scan(text, tool_names(tools), final=False)
        return _content(pieces, final=False)

    def _scan(self, text: str, names: frozenset[str], *, final: bool) -> tuple[list[_Piece], bool]:
        raise NotImplementedError


def _merge_text(pieces: list[_Piece]) -> list[_Piece]:
    """Adjacent text pieces (text around a rejected call) as one."""
    out: list[_Piece] = []
    for p in pieces:
        if p[0] == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + p[1])
        else:
            out.append(p)
    return out


def _content(pieces: list[_Piece], *, final: bool) -> str:
    """The content of decided pieces (see the module docstring). ``final=False``: what of it is settled."""
    pieces = _merge_text(pieces)
    if not any(p[0] == "call" for p in pieces):
        text = "".join(p[1] for p in pieces)
        # no call yet: trailing whitespace may still turn out to precede one (then it is dropped)
        return text if final else text.rstrip()
    parts = []
    for i, p in enumerate(pieces):
        if p[0] != "text":
            continue
        s = p[1]
        if i > 0:  # after a call
            s = s.lstrip()
        # before a call, at the end, or (not final) possibly before one
        s = s.rstrip()
        if s:
            parts.append(s)
    return "\n".join(parts)


def _call(obj: Any, names: frozenset[str], args_keys: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
    """``(name, arguments)`` when ``obj`` is a call of an offered tool with an object of arguments."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return name, args


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


_DECODER = json.JSONDecoder()


class HermesFormat(ToolCallFormat):
    """``<tool_call>{"name": …, "arguments": {…}}</tool_call>`` blocks anywhere in the reply (several allowed).
    A final block whose closing tag never came (the reply ended right after the JSON) is accepted."""

    name = "hermes"
    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    def _scan(self, text: str, names: frozenset[str], *, final: bool) -> tuple[list[_Piece], bool]:
        pieces: list[_Piece] = []
        pos = 0
        while True:
            start = text.find(self.OPEN, pos)
            if start < 0:
                tail = text[pos:]
                held = 0 if final else _partial_marker(tail, self.OPEN)
                pieces.append(("text", tail[: len(tail) - held]))
                return pieces, held > 0
            pieces.append(("text", text[pos:start]))
            body = _skip_ws(text, start + len(self.OPEN))
            try:
                obj, end = _DECODER.raw_decode(text, body)
            except json.JSONDecodeError as err:
                if not final and not self._broken(text, err):
                    return pieces, True  # the JSON may still be forming
                search_from = start + len(self.OPEN)
            else:
                after = _skip_ws(text, end)
                rest = text[after:]
                stop = -1
                if rest.startswith(self.CLOSE):
                    stop = after + len(self.CLOSE)
                elif not final and self.CLOSE.startswith(rest):
                    return pieces, True  # the closing tag may still come
                elif not rest:
                    stop = len(text)  # the reply ended after the JSON: a call without its closing tag
                if stop >= 0:
                    call = _call(obj, names, ("arguments", "parameters"))
                    pieces.append(("call", *call) if call else ("text", text[start:stop]))
                    pos = stop
                    continue
                search_from = end  # something else follows the JSON: not a call
            # Not a call: the block up to its closing tag is text.
            close = text.find(self.CLOSE, search_from)
            if close < 0:
                if not final:
                    return pieces, True
                pieces.append(("text", text[start:]))
                return pieces, False
            pieces.append(("text", text[start : close + len(self.CLOSE)]))
            pos = close + len(self.CLOSE)

    def _broken(self, text: str, err: json.JSONDecodeError) -> bool:
        """Whether no continuation of ``text`` can make this JSON valid: the decoder failed on characters that
        are followed by a closing tag (so they are fixed), not on running out of text. An unterminated string
        may still swallow that tag, so it is never broken yet."""
        if err.msg.startswith("Unterminated string"):
            return False
        return text.find(self.CLOSE, err.pos) >= 0


class LlamaJsonFormat(ToolCallFormat):
    """The whole reply is ``{"name": …, "parameters": {…}}`` (Llama 3.1+; ``"arguments"`` accepted too), after an
    optional ``<|python_tag|>``; several calls are separated by ``;`` or whitespace. A reply that starts like
    JSON is held back while streaming until it is finished (only then is it known to be a call or text)."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def _scan(self, text: str, names: frozenset[str], *, final: bool) -> tuple[list[_Piece], bool]:
        body = text.lstrip()
        if body.startswith(self.PYTHON_TAG):
            body = body[len(self.PYTHON_TAG) :].lstrip()
        elif not final and self.PYTHON_TAG.startswith(body):
            return [], True  # nothing yet, or the start of the tag
        if not final:
            return ([], True) if body.startswith("{") or not body else ([("text", text)], False)
        calls = self._calls(body, names)
        return ([("call", *c) for c in calls], False) if calls else ([("text", text)], False)

    @staticmethod
    def _calls(body: str, names: frozenset[str]) -> list[tuple[str, dict[str, Any]]]:
        calls, pos = [], 0
        while pos < len(body):
            try:
                obj, pos = _DECODER.raw_decode(body, pos)
            except ValueError:
                return []
            call = _call(obj, names, ("parameters", "arguments"))
            if call is None:
                return []
            calls.append(call)
            pos = _skip_ws(body, pos)
            if pos < len(body) and body[pos] == ";":
                pos = _skip_ws(body, pos + 1)
        return calls


_PROBE_NAME = "deltamem_probe_tool"
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": _PROBE_NAME, "description": "probe", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
}}]  # fmt: skip
_PROBE_MESSAGES = [
    {"role": "user", "content": "deltamem probe"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_probe", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"x": 1}}},
    ]},
]  # fmt: skip
_LLAMA_CALL = re.compile(r'\{\s*"name"\s*:\s*"' + _PROBE_NAME + r'"\s*,\s*"parameters"\s*:')


def detect_tool_format(tokenizer: Any) -> ToolCallFormat | None:
    """The tool-call format the tokenizer's chat template uses, or ``None`` (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the tool-use one is what a request with tools renders
        template = template.get("tool_use") or template.get("default")
    if not isinstance(template, str):
        return None
    try:
        rendered = tokenizer.apply_chat_template(_PROBE_MESSAGES, tools=_PROBE_TOOLS, tokenize=False,
                                                 chat_template=template)
    except Exception:  # noqa: BLE001 - a template that refuses the probe is judged by its source below
        rendered = ""
    if not isinstance(rendered, str):
        rendered = ""
    if HermesFormat.OPEN in rendered and _PROBE_NAME in rendered:
        return HermesFormat()
    if _LLAMA_CALL.search(rendered):
        return LlamaJsonFormat()
    # Templates that describe the format to the model but do not render past calls.
    if HermesFormat.OPEN in template and HermesFormat.CLOSE in template:
        return HermesFormat()
    return None

