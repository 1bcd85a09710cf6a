"""Ollama Modelfiles: `FROM`, a Go `TEMPLATE` translated from the model's Jinja chat template,
`PARAMETER stop` per end-of-turn token, sampling defaults, and `SYSTEM`.

The template is translated node by node from Jinja's own parse tree (a subset: loops over the
messages, if/elif/else, set, string concatenation, comparisons, role and content lookups), never
by pattern-matching the text, so a template outside the subset is refused with the construct
named instead of half-translated. The default system prompt and the end-of-turn markers are found
by rendering the Jinja template on probe conversations. Ollama's template context (its
`template/template.go`) has `.Messages` (Role, Content), `.System`, `.Think`, `.IsThinkSet` and
the one function `json`; Go's text/template adds `eq`, `ne`, `and`, `or`, `not`, `index`, `slice`,
`len` and `print`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from smolconvert.errors import UnsupportedError

# Ollama's templates cannot search a string: the reasoning switch that SmolLM3's template reads
# from the system prompt is Ollama's own think option (`ollama run --think=false`) instead.
THINK_FLAGS = {
    "/no_think": "(and $.IsThinkSet (not $.Think))",
    "/think": "(and $.IsThinkSet $.Think)",
}
# Jinja's loop attributes, as Go expressions over the range index `$i` of `ITER`.
_LOOP = {
    "first": "(eq $i 0)",
    "last": "(eq (len (slice ITER $i)) 1)",
    "index0": "$i",
}
_FIELDS = {"role": "Role", "content": "Content"}
_COMPARE = {"eq": "eq", "ne": "ne"}
# transformers renders chat templates with these settings (tokenization_utils_base)
_JINJA_OPTIONS = {"trim_blocks": True, "lstrip_blocks": True}


def jinja_environment() -> Any:
    """The environment transformers renders chat templates in (sandboxed, trimmed blocks)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(extensions=[loopcontrols], **_JINJA_OPTIONS)

    def raise_exception(message: str) -> None:
        raise UnsupportedError(f"the chat template raised: {message}")

    env.globals["raise_exception"] = raise_exception
    return env


def render_jinja(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    special: dict[str, str] | None = None,
) -> str:
    """The prompt transformers' apply_chat_template(tokenize=False) would give."""
    env = jinja_environment()
    return str(
        env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **(special or {})
        )
    )


# ---- translation ----


@dataclass
class _Scope:
    loop_var: str | None = None  # the Jinja name of the message in the enclosing loop
    loop_iter: str | None = None  # the Go expression the loop ranges over


class _Translator:
    def __init__(self, special: dict[str, str]) -> None:
        self.special = special
        self.assigned: list[str] = []

    def template(self, source: str) -> str:
        from jinja2 import nodes

        tree = jinja_environment().parse(source)
        for node in tree.find_all(nodes.Assign):
            if not isinstance(node.target, nodes.Name):
                raise UnsupportedError("the chat template assigns to a tuple; not translatable")
            if node.target.name not in self.assigned:
                self.assigned.append(node.target.name)
        body = "".join(self.statements(tree.body, _Scope()))
        # Ollama renders for generation: Jinja's add_generation_prompt is true unless the
        # conversation ends with the assistant (a continued reply). Every `set` is declared
        # once up front: a Go variable declared inside {{if}} would end with that block.
        head = (
            "{{$add_generation_prompt := true}}{{range $.Messages}}"
            '{{$add_generation_prompt = ne .Role "assistant"}}{{end}}'
        )
        head += "".join(f'{{{{${name} := ""}}}}' for name in self.assigned)
        return head + body

    def statements(self, body: Sequence[Any], scope: _Scope) -> Iterator[str]:
        from jinja2 import nodes

        for node in body:
            if isinstance(node, nodes.Output):
                for child in node.nodes:
                    yield from self.output(child, scope)
            elif isinstance(node, nodes.If):
                yield from self.if_(node, scope)
            elif isinstance(node, nodes.For):
                yield from self.for_(node, scope)
            elif isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name):
                yield f"{{{{${node.target.name} = {self.expr(node.node, scope)}}}}}"
            else:
                raise UnsupportedError(
                    f"the chat template uses {{% {type(node).__name__.lower()} %}}, which "
                    "smolconvert cannot translate to an Ollama template"
                )

    def output(self, node: Any, scope: _Scope) -> Iterator[str]:
        from jinja2 import nodes

        if isinstance(node, nodes.TemplateData):
            yield _literal(node.data)
        elif isinstance(node, nodes.Const) and isinstance(node.value, str):
            yield _literal(node.value)
        elif isinstance(node, (nodes.Add, nodes.Concat)):  # string concatenation: piece by piece
            parts = node.nodes if isinstance(node, nodes.Concat) else [node.left, node.right]
            for part in parts:
                yield from self.output(part, scope)
        elif isinstance(node, nodes.CondExpr):
            yield f"{{{{if {self.expr(node.test, scope)}}}}}"
            yield from self.output(node.expr1, scope)
            if node.expr2 is not None:
                yield "{{else}}"
                yield from self.output(node.expr2, scope)
            yield "{{end}}"
        else:
            yield f"{{{{{self.expr(node, scope)}}}}}"

    def if_(self, node: Any, scope: _Scope) -> Iterator[str]:
        yield f"{{{{if {self.expr(node.test, scope)}}}}}"
        yield from self.statements(node.body, scope)
        for branch in node.elif_:
            yield f"{{{{else if {self.expr(branch.test, scope)}}}}}"
            yield from self.statements(branch.body, scope)
        if node.else_:
            yield "{{else}}"
            yield from self.statements(node.else_, scope)
        yield "{{end}}"

    def for_(self, node: Any, scope: _Scope) -> Iterator[str]:
        from jinja2 import nodes

        if not isinstance(node.target, nodes.Name) or node.test is not None or node.else_:
            raise UnsupportedError(
                "the chat template's for-loop unpacks, filters or has an else branch; "
                "not translatable to an Ollama template"
            )
        iterable = self.expr(node.iter, scope)
        if "$.Messages" not in iterable:
            raise UnsupportedError("the chat template loops over something other than messages")
        inner = _Scope(node.target.name, iterable)
        yield f"{{{{range $i, ${node.target.name} := {iterable}}}}}"
        yield from self.statements(node.body, inner)
        yield "{{end}}"

    def expr(self, node: Any, scope: _Scope) -> str:
        from jinja2 import nodes

        if isinstance(node, nodes.Const):
            if isinstance(node.value, bool):
                return "true" if node.value else "false"
            if isinstance(node.value, (str, int)):
                return json.dumps(node.value, ensure_ascii=False)
        elif isinstance(node, nodes.Name):
            return self.name(node.name, scope)
        elif isinstance(node, (nodes.Getitem, nodes.Getattr)):
            return self.lookup(node, scope)
        elif isinstance(node, nodes.Compare) and len(node.ops) == 1:
            op = node.ops[0]
            if op.op == "in":
                return self.contains(node.expr, op.expr)
            if op.op == "notin":
                return f"(not {self.contains(node.expr, op.expr)})"
            if op.op in _COMPARE:
                left, right = self.expr(node.expr, scope), self.expr(op.expr, scope)
                return f"({_COMPARE[op.op]} {left} {right})"
        elif isinstance(node, nodes.And):
            return f"(and {self.expr(node.left, scope)} {self.expr(node.right, scope)})"
        elif isinstance(node, nodes.Or):
            return f"(or {self.expr(node.left, scope)} {self.expr(node.right, scope)})"
        elif isinstance(node, nodes.Not):
            return f"(not {self.expr(node.node, scope)})"
        elif isinstance(node, (nodes.Add, nodes.Concat)):
            parts = node.nodes if isinstance(node, nodes.Concat) else [node.left, node.right]
            return "(print " + " ".join(self.expr(p, scope) for p in parts) + ")"
        raise UnsupportedError(
            f"the chat template uses the expression {type(node).__name__} "
            f"({_source_hint(node)}), which smolconvert cannot translate to an Ollama template"
        )

    def name(self, name: str, scope: _Scope) -> str:
        if name == "messages":
            return "$.Messages"
        if name == scope.loop_var:
            return f"${name}"
        if name == "add_generation_prompt" or name in self.assigned:
            return f"${name}"
        if name in self.special:  # bos_token, eos_token: their text, as transformers renders
            return json.dumps(self.special[name], ensure_ascii=False)
        raise UnsupportedError(
            f"the chat template reads {name!r}, which Ollama does not provide; write the "
            "Modelfile's TEMPLATE by hand"
        )

    def lookup(self, node: Any, scope: _Scope) -> str:
        from jinja2 import nodes

        key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        if isinstance(node.node, nodes.Name) and node.node.name == "loop":
            if scope.loop_iter is None or key not in _LOOP:
                raise UnsupportedError(f"the chat template reads loop.{key}; not translatable")
            return _LOOP[key].replace("ITER", scope.loop_iter)
        base = self.expr(node.node, scope)
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
            s = node.arg
            if s.stop is None and s.step is None and isinstance(s.start, nodes.Const):
                return f"(slice {base} {int(s.start.value)})"
        elif isinstance(key, int):
            return f"(index {base} {key})"
        elif key in _FIELDS:
            return f"{base}.{_FIELDS[key]}"
        raise UnsupportedError(
            f"the chat template reads [{_source_hint(node)}], which smolconvert cannot "
            "translate to an Ollama template"
        )

    def contains(self, needle: Any, haystack: Any) -> str:
        from jinja2 import nodes

        if isinstance(needle, nodes.Const) and needle.value in THINK_FLAGS:
            return THINK_FLAGS[needle.value]
        raise UnsupportedError(
            f"the chat template tests whether {_source_hint(needle)} is in "
            f"{_source_hint(haystack)}; Ollama's templates cannot search a string"
        )


def _literal(text: str) -> str:
    """Template text as Go emits it: verbatim, but `{{` cannot appear outside an action."""
    return text.replace("{{", '{{"{{"}}')


def _source_hint(node: Any) -> str:
    from jinja2 import nodes

    if isinstance(node, nodes.Const):
        return repr(node.value)
    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, (nodes.Getattr, nodes.Getitem)):
        key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", "...")
        return f"{_source_hint(node.node)}[{key!r}]"
    return type(node).__name__


def to_go_template(template: str, special: dict[str, str] | None = None) -> str:
    """Ollama's Go TEMPLATE for a Jinja chat template; UnsupportedError names what is not
    translatable. `special` maps bos_token / eos_token to their text."""
    return _Translator(special or {}).template(template)


# ---- what the template says about the conversation ----

_USER, _SYSTEM, _REPLY = "\x01user-probe\x01", "\x01system-probe\x01", "\x01reply-probe\x01"


def default_system(template: str, special: dict[str, str] | None = None) -> str | None:
    """The system prompt the template inserts when the conversation has none (None: none)."""
    special = special or {}
    plain = render_jinja(template, [{"role": "user", "content": _USER}], special=special)
    given = render_jinja(
        template,
        [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}],
        special=special,
    )
    if _SYSTEM not in given:
        return None
    before, _, after = given.partition(_SYSTEM)
    after = after[: after.index(_USER)] if _USER in after else after
    if not plain.startswith(before) or after not in plain[len(before) :]:
        return None
    text = plain[len(before) : plain.index(after, len(before))]
    return text or None


def turn_end(template: str, special: dict[str, str] | None = None) -> str:
    """What the template writes right after an assistant message (up to the next newline or the
    next turn): the marker a runtime must stop at, e.g. `<|im_end|>`."""
    messages = [
        {"role": "user", "content": _USER},
        {"role": "assistant", "content": _REPLY},
        {"role": "user", "content": _USER},
    ]
    text = render_jinja(template, messages, special=special or {})
    if _REPLY not in text:
        return ""
    after = text.split(_REPLY, 1)[1]
    return after.split("\n", 1)[0].split(_USER, 1)[0]


@dataclass(frozen=True)
class Modelfile:
    gguf_file: str
    template: str | None  # Go template, or None when the chat template is not translatable
    stop: tuple[str, ...]
    system: str | None
    parameters: tuple[tuple[str, float], ...]  # e.g. ("temperature", 0.6)
    note: str | None = None  # why there is no TEMPLATE

    def text(self) -> str:
        lines = [
            "# Ollama Modelfile written by smolconvert: ollama create NAME -f Modelfile",
            f"FROM ./{self.gguf_file}",
        ]
        if self.template is not None:
            lines.append(f'TEMPLATE """{self.template}"""')
        elif self.note:
            lines.append(f"# No TEMPLATE: {self.note}")
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f'PARAMETER stop "{_quote(s)}"' for s in self.stop]
        lines += [f"PARAMETER {k} {v:g}" for k, v in self.parameters]
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def build_modelfile(
    gguf_file: str,
    chat_template: str | None,
    stop_tokens: Sequence[str],
    generation: dict[str, Any],
    special: dict[str, str] | None = None,
) -> Modelfile:
    """A Modelfile for `gguf_file`. `stop_tokens`: the end-of-generation token texts (eos and
    generation_config's eos list); the template's own turn end is added to them."""
    template = note = system = None
    stops = list(dict.fromkeys(s for s in stop_tokens if s))
    if chat_template:
        try:
            template = to_go_template(chat_template, special)
            system = default_system(chat_template, special)
            end = turn_end(chat_template, special)
            if end and end not in stops:
                stops.append(end)
        except UnsupportedError as e:
            template, note = None, str(e)
    else:
        note = "the model has no chat template"
    for bad in (template, system, *stops):
        if bad is not None and '"""' in bad:
            raise UnsupportedError('the chat template holds """, which a Modelfile cannot quote')
    params = tuple(
        (k, float(generation[k]))
        for k in ("temperature", "top_p", "top_k", "repeat_penalty")
        if isinstance(generation.get(k), (int, float)) and not isinstance(generation[k], bool)
    )
    return Modelfile(gguf_file, template, tuple(stops), system, params, note)


def modelfile_for(model: Any, gguf_file: str) -> Modelfile:
    """The Modelfile of a CanonicalModel's GGUF: its template, eos ids (the tokenizer's and
    generation_config.json's) as stops, and generation_config.json's sampling defaults."""
    tok = model.tokenizer
    generation = dict(model.generation)
    eos = generation.pop("eos_token_id", None)
    ids = [tok.special.eos, *(eos if isinstance(eos, list) else [eos])]
    stops = [tok.backend.id_to_token(i) for i in ids if isinstance(i, int)]
    special = {
        name: tok.backend.id_to_token(i)
        for name, i in (("bos_token", tok.special.bos), ("eos_token", tok.special.eos))
        if i is not None
    }
    if "repetition_penalty" in generation:  # Ollama's name for it
        generation["repeat_penalty"] = generation.pop("repetition_penalty")
    return build_modelfile(
        gguf_file, tok.chat_template, [s for s in stops if s], generation, special
    )
