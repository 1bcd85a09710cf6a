"""Ollama Modelfiles: the Go TEMPLATE renders, in Go's own text/template, the prompt that the
model's Jinja chat template renders through transformers, on the same conversations."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from smolconvert.errors import UnsupportedError
from smolconvert.publish import ollama
from tests import published

GO_RENDERER = Path(__file__).parents[1] / "go"

CONVERSATIONS: list[tuple[list[dict[str, str]], bool | None]] = [
    ([{"role": "user", "content": "What is 2+2?"}], None),
    ([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}], None),
    (
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": 'Another, with {{ braces }} and "quotes".'},
        ],
        None,
    ),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], None),
    # SmolLM3's reasoning switch: "/no_think" in the system prompt for Jinja, the think option
    # (`ollama run --think=false`) for Ollama; the system text itself is passed to both.
    (
        [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "Hi"}],
        False,
    ),
    (
        [
            {"role": "system", "content": "Think it through. /think"},
            {"role": "user", "content": "Hi"},
        ],
        True,
    ),
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> Any:
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go); cannot render")
    binary = tmp_path_factory.mktemp("go") / "render"
    cache = tmp_path_factory.mktemp("gocache")
    env = {"GOCACHE": str(cache), "GOPATH": str(cache / "path"), "GOFLAGS": "-mod=mod"}
    env |= {"HOME": str(cache), "PATH": "/usr/bin:/bin", "GOTOOLCHAIN": "local"}
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=GO_RENDERER, env=env, check=True)

    def render(template: str, data: dict[str, Any]) -> str:
        proc = subprocess.run(
            [str(binary)],
            input=json.dumps({"template": template, "data": data}),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return render


def ollama_values(
    messages: list[dict[str, str]], system: str | None, think: bool | None
) -> dict[str, Any]:
    """What Ollama's server hands a template for a chat request: the Modelfile's SYSTEM first
    when the request has no system message (server/routes.go), consecutive messages of one role
    joined (template.go `collate`), and the think option as `.Think` / `.IsThinkSet`."""
    msgs = [dict(m) for m in messages]
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["role"] == m["role"]:
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append(m)
    return {
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in collated],
        "System": "\n\n".join(m["content"] for m in msgs if m["role"] == "system"),
        "Think": bool(think),
        "IsThinkSet": think is not None,
        "Response": "",
    }


@pytest.mark.parametrize("name", ["SmolLM2-360M-Instruct", "SmolLM3-3B"])
def test_go_template_renders_what_transformers_renders(
    tmp_path: Path, name: str, go_render: Any
) -> None:
    transformers = pytest.importorskip("transformers")
    from smolconvert.api import load

    folder = published.write_published(tmp_path / name, name)
    model = load(folder)
    modelfile = ollama.modelfile_for(model, "model.gguf")
    assert modelfile.template is not None, modelfile.note
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for messages, think in CONVERSATIONS:
        if think is not None and "/no_think" not in model.tokenizer.chat_template:
            continue
        expected = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=messages[-1]["role"] != "assistant"
        )
        got = go_render(modelfile.template, ollama_values(messages, modelfile.system, think))
        assert got == expected, (messages, got, expected)


def test_smollm2_modelfile_has_its_default_system_prompt_and_stop(tmp_path: Path) -> None:
    from smolconvert.api import load

    model = load(published.write_published(tmp_path / "m", "SmolLM2-360M-Instruct"))
    mf = ollama.modelfile_for(model, "m.gguf")
    assert mf.system == published.SMOLLM2_SYSTEM
    assert mf.stop == ("<|im_end|>",)
    text = mf.text()
    assert text.splitlines()[1] == "FROM ./m.gguf"
    assert f'SYSTEM """{published.SMOLLM2_SYSTEM}"""' in text


def test_smollm3_modelfile_takes_generation_config(tmp_path: Path) -> None:
    from smolconvert.api import load

    model = load(published.write_published(tmp_path / "m", "SmolLM3-3B"))
    mf = ollama.modelfile_for(model, "m.gguf")
    assert mf.system is None  # its template's system block is empty without a system message
    assert mf.stop == ("<|im_end|>",)  # eos 128012, also the turn end
    assert dict(mf.parameters) == {"temperature": 0.6, "top_p": 0.95}
    assert "PARAMETER temperature 0.6\nPARAMETER top_p 0.95\n" in mf.text()


@pytest.mark.parametrize(
    ("template", "named"),
    [
        ("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}", "Filter"),
        ("{% for m in messages %}{% if 'x' in m['content'] %}y{% endif %}{% endfor %}", "search"),
        ("{{ tools }}{% for m in messages %}{{ m.content }}{% endfor %}", "'tools'"),
        ("{% for m in messages %}{{ loop.index }}{% endfor %}", "loop.index"),
        ("{% macro f() %}{% endmacro %}", "macro"),
    ],
)
def test_untranslatable_templates_are_named_not_half_written(template: str, named: str) -> None:
    with pytest.raises(UnsupportedError, match=named):
        ollama.to_go_template(template)
    mf = ollama.build_modelfile("m.gguf", template, ["</s>"], {})
    assert mf.template is None
    assert not any(line.startswith("TEMPLATE") for line in mf.text().splitlines())
    assert named.strip("'") in (mf.note or "")


def test_braces_in_template_text_survive_go(go_render: Any) -> None:
    template = "{% for m in messages %}{{ '{{' }}{{ m['content'] }}}}{% endfor %}"
    go = ollama.to_go_template(template)
    data = ollama_values([{"role": "user", "content": "a"}], None, None)
    assert go_render(go, data) == ollama.render_jinja(template, [{"role": "user", "content": "a"}])


def test_gguf_export_writes_the_modelfile_beside_the_file(tmp_path: Path) -> None:
    from smolconvert.api import export

    folder = published.write_published(tmp_path / "SmolLM2-360M-Instruct", "SmolLM2-360M-Instruct")
    art = export(folder, to="gguf:q8_0", out=tmp_path / "out")
    text = (art.folder / "Modelfile").read_text()
    assert f"FROM ./{art.meta['entry_points']['model']}\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert art.meta["modelfile"] == {"template": True, "stop": ["<|im_end|>"], "note": None}
    assert "Modelfile" in {f["path"] for f in art.meta["files"]}
    # the card and the Modelfile are for people: an artifact's size (what size budgets and
    # gates read) is the bytes the runtime loads
    gguf = art.folder / art.meta["entry_points"]["model"]
    assert {f["path"] for f in art.meta["files"]} == {gguf.name, "Modelfile", "README.md"}
    assert art.size_bytes == gguf.stat().st_size
