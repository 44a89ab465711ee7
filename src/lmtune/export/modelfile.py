"""An Ollama `Modelfile` for an exported GGUF: FROM, TEMPLATE (Go text/template), SYSTEM, PARAMETER stop.

The Jinja chat template cannot be translated in general, so it is *probed*: rendered on conversations of
marker strings, the text around each marker gives each role's prefix and suffix, the generation prompt and any
system prompt the template adds on its own. A template that does not decompose so (it reorders or rewrites
messages) gets no TEMPLATE line, and Ollama falls back to the template stored in the GGUF file.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_S, _U1, _A1, _U2, _A2 = "SYSQZX", "USRQZX", "ASTQZX", "USRQZY", "ASTQZY"


@dataclass(frozen=True)
class ChatFormat:
    """The literal text a chat template puts around each message."""

    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    default_system: str | None


def _render(tokenizer: PreTrainedTokenizerBase, turns: list[tuple[str, str]], generation: bool) -> str:
    messages = [{"role": role, "content": text} for role, text in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, *markers: str) -> list[str]:
    """The pieces of `text` before, between and after `markers`, which must appear once each, in order."""
    pieces, rest = [], text
    for marker in markers:
        before, found, rest = rest.partition(marker)
        if not found or marker in rest:
            raise ValueError(marker)
        pieces.append(before)
    return [*pieces, rest]


def probe(tokenizer: PreTrainedTokenizerBase) -> ChatFormat | None:
    """Each role's (prefix, suffix), or None where the template is not a plain concatenation of messages."""
    try:
        full = _render(tokenizer, [("system", _S), ("user", _U1), ("assistant", _A1), ("user", _U2),
                                   ("assistant", _A2)], False)
        sys_pre, sys_user, user_ast, ast_user, user_ast2, ast_suf = _between(full, _S, _U1, _A1, _U2, _A2)
        user_suf = _between(_render(tokenizer, [("system", _S), ("user", _U1)], False), _S, _U1)[2]
        prompt = _between(_render(tokenizer, [("system", _S), ("user", _U1)], True), _S, _U1)[2]
        alone = _between(_render(tokenizer, [("user", _U1)], False), _U1)[0]
    except Exception:  # noqa: BLE001 - templates raise anything (e.g. on a system role); then there is no probe
        return None
    user_pre = ast_user.removeprefix(ast_suf)
    ast_pre = prompt.removeprefix(user_suf)
    consistent = (ast_user.startswith(ast_suf) and sys_user.endswith(user_pre) and prompt.startswith(user_suf)
                  and user_ast == user_ast2 == user_suf + ast_pre and alone.endswith(user_pre))
    if not consistent:
        return None
    system = (sys_pre, sys_user.removesuffix(user_pre))
    default = alone.removesuffix(user_pre)
    default_system = None
    if default:  # the template adds a system message of its own when none is given
        if not (default.startswith(system[0]) and default.endswith(system[1])):
            return None
        default_system = default[len(system[0]):len(default) - len(system[1])]
    return ChatFormat(system, (user_pre, user_suf), (ast_pre, ast_suf), default_system)


def go_template(chat: ChatFormat) -> str:
    """The same format as an Ollama TEMPLATE: every message wrapped, then the assistant prefix after a user turn.

    No `{{-` trim markers: they would eat the newlines that are part of the format.
    """
    (sp, ss), (up, us), (ap, as_) = chat.system, chat.user, chat.assistant
    return ('{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
            f'{{{{ if eq .Role "system" }}}}{sp}{{{{ .Content }}}}{ss}'
            f'{{{{ else if eq .Role "user" }}}}{up}{{{{ .Content }}}}{us}{{{{ if $last }}}}{ap}{{{{ end }}}}'
            f'{{{{ else if eq .Role "assistant" }}}}{ap}{{{{ .Content }}}}{{{{ if not $last }}}}{as_}{{{{ end }}}}'
            '{{ end }}{{ end }}')


def _stops(tokenizer: PreTrainedTokenizerBase, chat: ChatFormat | None) -> list[str]:
    """EOS and the special tokens that end an answer or open the next turn."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if chat is not None:
        edges = chat.assistant[1] + chat.user[0]
        stops += [t for t in tokenizer.all_special_tokens if t and t in edges]
    return list(dict.fromkeys(stops))


def _quotable(text: str) -> bool:
    return '"""' not in text and not text.endswith('"')


def modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Modelfile text for `gguf_name` (a path relative to the Modelfile)."""
    chat = probe(tokenizer) if tokenizer.chat_template else None
    lines = [f"FROM ./{gguf_name}"]
    if chat is not None and "{{" not in "".join(chat.system + chat.user + chat.assistant):
        template = go_template(chat)
        if _quotable(template):
            lines.append(f'TEMPLATE """{template}"""')
        if chat.default_system and _quotable(chat.default_system):
            lines.append(f'SYSTEM """{chat.default_system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in _stops(tokenizer, chat)]
    return "\n".join(lines) + "\n"
