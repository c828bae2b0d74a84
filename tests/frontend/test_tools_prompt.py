"""Tools in the prompt (``vlmdeploy.frontend.tools``): a template that renders tools gets them; any
other template gets the same text written into the messages, in Qwen3's format."""

from __future__ import annotations

import json

import pytest

from vlmdeploy.frontend.chat_template import ChatTemplate
from vlmdeploy.frontend.prompt import build_conversation
from vlmdeploy.frontend.tools import inline_tools, template_renders_tools

# A Qwen3-style template that renders tools, tool calls and tool results itself (written for this
# test in the layout Qwen3's template produces: tools in the system prompt, <tool_call> blocks,
# runs of tool results as one user turn of <tool_response> blocks).
QWEN_STYLE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and loop.first %}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' + (m.content or '') }}"
    "{%- for c in m.tool_calls %}{% set f = c.function %}"
    "{%- if (loop.first and m.content) or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
    "{%- if f.arguments is string %}{{ f.arguments }}"
    "{%- else %}{{ f.arguments | tojson }}{% endif %}"
    "{{- '}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9"},
    {"role": "assistant", "content": "Let me check the time.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "noon"},
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from vlmdeploy.assets import default_model_path
    from vlmdeploy.frontend.tokenizer import Tokenizer

    return Tokenizer(str(default_model_path())).hf


def _want(hf_tokenizer, messages, tools):
    return hf_tokenizer.apply_chat_template(messages, chat_template=QWEN_STYLE, tools=tools,
                                            tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("messages", [HISTORY, HISTORY[1:2], HISTORY[1:]],
                         ids=["system-history", "first-turn", "no-system-history"])
@pytest.mark.parametrize("tools", [[WEATHER, TIME], None], ids=["tools", "no-tools"])
def test_a_plain_template_gets_the_text_a_tool_template_renders(hf_tokenizer, messages, tools):
    want = _want(hf_tokenizer, messages, tools)
    conv = build_conversation(messages)
    assert ChatTemplate(None).render(conv.messages, tools=tools) == want  # ChatML: inlined
    assert ChatTemplate(QWEN_STYLE).render(conv.messages, tools=tools) == want  # its own


def test_the_tool_block_lists_each_tool_as_sent():
    text = ChatTemplate(None).render([{"role": "user", "content": "hi"}], tools=[WEATHER, TIME])
    block = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert [json.loads(line) for line in block.split("\n")] == [WEATHER, TIME]
    assert "°C" in block  # not escaped to \u00b0


def test_template_detection():
    assert template_renders_tools(QWEN_STYLE)
    assert not template_renders_tools(None)
    assert not template_renders_tools("{{ messages[0].content }}")


def test_assistant_prefix_follows_the_generation_prompt():
    tpl = ChatTemplate(None)
    msgs = [{"role": "user", "content": "hi"}]
    assert tpl.render(msgs, assistant_prefix="<tool_call>\n") == \
        tpl.render(msgs) + "<tool_call>\n"
    assert tpl.render(msgs, add_generation_prompt=False, assistant_prefix="x") == \
        tpl.render(msgs, add_generation_prompt=False)


def test_inline_tools_keeps_plain_conversations():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert inline_tools(msgs, None) == msgs


def test_tool_messages_without_a_tool_call_id_render_and_unknown_roles_still_fail():
    conv = build_conversation([{"role": "user", "content": "x"},
                               {"role": "tool", "content": "result"}])
    assert "<tool_response>\nresult\n</tool_response>" in ChatTemplate(None).render(conv.messages)
    from vlmdeploy.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        build_conversation([{"role": "function", "content": "x"}])


def test_the_embedded_models_prompt_carries_tools_and_the_forced_head():
    from vlmdeploy.assets import default_model_path
    from vlmdeploy.frontend.prompt import PromptEncoder
    from vlmdeploy.frontend.tokenizer import Tokenizer

    encoder = PromptEncoder(Tokenizer(str(default_model_path())))
    text, images = encoder.render(HISTORY[1:2], {"tools": [WEATHER],
                                                 "assistant_prefix": "<tool_call>\n"})
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(WEATHER, ensure_ascii=False) in text and images == []
    assert text.endswith("<|im_start|>assistant\n<tool_call>\n")
    assert encoder.token_ids(text, []) == encoder.encode(text)
