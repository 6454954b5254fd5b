"""Chat: render conversations into prompts, and split replies into thinking, answer and tool calls."""

from tunelab.chat.output_parser import ContentDelta, Event, OutputParser, ParsedOutput, ThinkingDelta, parse_output
from tunelab.chat.template import ChatTemplate
from tunelab.chat.thinking import ThinkingBudget, resolve_thinking, soft_switch
from tunelab.chat.tool_calls import ToolCall, parse_tool_call

__all__ = [
    "ChatTemplate", "ContentDelta", "Event", "OutputParser", "ParsedOutput", "ThinkingBudget", "ThinkingDelta",
    "ToolCall", "parse_output", "parse_tool_call", "resolve_thinking", "soft_switch",
]
