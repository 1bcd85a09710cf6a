"""The release pipeline on a tiny model: build, gate, cache, resume, shards and merge, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import smolconvert
from smolconvert.cli import cli
from smolconvert.errors import ConfigError
from smolconvert.release_config import load_config
from tests import tiny
from tests.conftest import require_module

TARGETS = """
[[targets]]
target = "gguf:q8_0"
budget = {{ kld_mean = {q8_kld}, top1_min = 0.5, size_max_mb = 2 }}

[[targets]]
target = "gguf:{second}"
imatrix = true
[targets.budget]
kld_mean = 0.5
ppl_ratio_max = 2.0
"""


def write_config(
    tmp: Path, second: str = "q4_k_s", q8_kld: float = 0.05, latency: bool = False
) -> Path:
    model = tmp / "model"
    if not model.exists():
        tiny.write_folder(model, tiny.config("llama", hidden_size=256, intermediate_size=512))
    cfg = tmp / "release.toml"
    cfg.write_text(
        f'[release]\nsource = "model"\nout = "out"\nctx = 64\nwindows = 2\n'
        f"latency = {str(latency).lower()}\n" + TARGETS.format(q8_kld=q8_kld, second=second)
    )
    return cfg


def artifact_hashes(manifest: dict) -> dict[str, dict[str, str]]:
    return {a["name"]: {f["path"]: f["sha256"] for f in a["files"]} for a in manifest["artifacts"]}


@pytest.fixture(autouse=True)
def _llama_cpp() -> None:
    require_module("llama_cpp", "gguf")


def test_release_builds_gates_and_caches(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    events: list[dict] = []
    result = smolconvert.release(cfg, events=events.append)
    out = tmp_path / "out"
    assert result.passed, [f.message() for f in result.failures]
    assert sorted(result.built) == ["gguf-q4_k_s", "gguf-q8_0"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [a["name"] for a in manifest["artifacts"]] == ["gguf-q4_k_s", "gguf-q8_0"]
    q4 = manifest["artifacts"][0]
    assert q4["imatrix"] is not None and q4["tensor_types"]
    # the q8_0 artifact really is closer to the reference than the 4-bit one
    kld = {a["name"]: a["metrics"]["kld_mean"] for a in manifest["artifacts"]}
    assert 0 < kld["gguf-q8_0"] < kld["gguf-q4_k_s"]
    for f in q4["files"]:
        assert (out / q4["folder"] / f["path"]).stat().st_size == f["size_bytes"]
    md = (out / "report.md").read_text()
    assert "gguf:q8_0" in md and "gguf:q4_k_s" in md and "llama.cpp" in md
    page = (out / "report.html").read_text()
    assert (
        "<svg" in page
        and "Pareto" in page
        and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    )
    from huggingface_hub import ModelCard

    for a in manifest["artifacts"]:  # every card carries the release's measurements
        text = (out / a["folder"] / "README.md").read_text()
        assert ModelCard.load(out / a["folder"] / "README.md").data.base_model_relation == (
            "quantized"
        )
        assert f"| mean KL divergence | {a['metrics']['kld_mean']:.4f} |" in text
    release_card = ModelCard.load(out / "README.md")
    assert release_card.data.base_model_relation == "quantized"
    assert "gguf:q4_k_s" in release_card.text and "gguf" in release_card.data.tags
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "imatrix" in kinds
    assert all("elapsed_s" in e for e in events)

    again = smolconvert.release(cfg)  # nothing changed: nothing exported, nothing measured
    assert again.built == [] and again.validated == []
    assert artifact_hashes(again.manifest) == artifact_hashes(manifest)

    changed = smolconvert.release(write_config(tmp_path, q8_kld=0.05, second="q5_k_s"))
    assert changed.built == ["gguf-q5_k_s"]  # only the changed target
    assert changed.validated == ["gguf-q5_k_s"]


def test_interrupted_release_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from smolconvert.targets import Family

    cfg = write_config(tmp_path)
    real = Family.export
    calls: list[str] = []

    def export_then_die(self, model, scheme, out, **kw):  # noqa: ANN001
        calls.append(scheme)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the second export
        return real(self, model, scheme, out, **kw)

    monkeypatch.setattr(Family, "export", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        smolconvert.release(cfg)
    monkeypatch.setattr(Family, "export", real)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if ".partial-" in p.name]
    resumed = smolconvert.release(cfg)
    assert len(resumed.built) == 1 and resumed.passed  # the first target was kept


def test_strict_budget_fails_and_names_everything(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, q8_kld=1e-9)
    result = CliRunner().invoke(cli, ["release", str(cfg)])
    assert result.exit_code == 3, result.output
    line = [x for x in result.stderr.splitlines() if x.startswith("gate failed")]
    assert len(line) == 1
    assert "gguf:q8_0" in line[0] and "kld_mean" in line[0] and "1e-09" in line[0]
    value = json.loads((tmp_path / "out" / "manifest.json").read_text())["artifacts"][1]
    assert f"{value['metrics']['kld_mean']:.6g}" in line[0]


def test_shards_merge_to_the_unsharded_release(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path)
    whole = smolconvert.release(cfg_path)
    parts = []
    for i in (1, 2):
        cfg = load_config(cfg_path)
        shard_cfg = type(cfg)(**{**cfg.__dict__, "out": tmp_path / f"shard{i}"})
        parts.append(smolconvert.release(shard_cfg, shard=(i, 2)))
    assert [len(p.manifest["artifacts"]) for p in parts] == [1, 1]
    assert parts[0].manifest["shard"] == "1/2"
    merged = smolconvert.merge_releases([tmp_path / "shard1", tmp_path / "shard2"], tmp_path / "m")
    assert artifact_hashes(merged.manifest) == artifact_hashes(whole.manifest)
    assert merged.manifest["shard"] is None
    assert (tmp_path / "m" / "report.md").is_file()
    for a in merged.manifest["artifacts"]:
        assert (tmp_path / "m" / a["folder"] / "artifact.json").is_file()


def test_json_events_and_latency_budget(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, latency=True)
    text = cfg.read_text().replace("size_max_mb = 2", "size_max_mb = 2, decode_tok_s_min = 1")
    cfg.write_text(text)
    result = CliRunner().invoke(cli, ["release", "run", str(cfg), "--json-events"])
    assert result.exit_code == 0, result.output + result.stderr
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["failures"] == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["reference_latency"]["decode_tok_s"] > 0
    for a in manifest["artifacts"]:
        assert a["metrics"]["decode_tok_s"] > 1


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        (
            '[release]\nsource = "m"\nwindow = 3\n[[targets]]\ntarget = "gguf:q8_0"\n',
            "line 3: unknown key 'window'",
        ),
        (
            '[release]\nsource = "m"\n[[targets]]\ntarget = "gguf:q8_0"\n'
            "budget = { kld_mea = 0.1 }\n",
            "line 5: unknown key 'kld_mea'",
        ),
        ('[release]\nsource = "m"\n[[targets]]\ntarget = "gguf:q9_0"\n', "unknown scheme 'q9_0'"),
        (
            '[release]\nsource = "m"\n[[targets]]\ntarget = "gguf:q8_0"\n[[targets]]\n'
            'target = "gguf:q8_0"\n',
            "two targets are named 'gguf-q8_0'",
        ),
        (
            '[release]\nsource = "m"\nlatency = false\n[[targets]]\ntarget = "gguf:q8_0"\n'
            "budget = { decode_tok_s_min = 3 }\n",
            "needs latency = true",
        ),
        (
            '[release]\nsource = "m"\n[[targets]]\ntarget = "gguf:q8_0"\n'
            "options = { layout = 1 }\n",
            "no option layout",
        ),
    ],
)
def test_bad_configs_are_named(tmp_path: Path, snippet: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(snippet)
    with pytest.raises(Exception) as err:
        load_config(cfg)
    assert message in str(err.value)
    result = CliRunner().invoke(cli, ["release", str(cfg)])
    assert result.exit_code == 2 and message in result.stderr


def test_dict_config_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    cfg = load_config({"release": {"source": "default"}, "targets": [{"target": "gguf:q8_0"}]})
    assert cfg.targets[0].name == "gguf-q8_0" and cfg.source == "default"


# ---- shards, locks and caches that must not be trusted blindly (issue 23) ----


def small_config(tmp: Path) -> Path:
    """Two fast targets on the smallest tiny model, no latency: for tests of the machinery."""
    tiny.write_folder(tmp / "model", tiny.config("llama"))
    cfg = tmp / "release.toml"
    cfg.write_text(
        '[release]\nsource = "model"\nout = "out"\nctx = 32\nwindows = 1\nlatency = false\n'
        '[[targets]]\ntarget = "gguf:q8_0"\n[[targets]]\ntarget = "gguf:f16"\n'
    )
    return cfg


def test_empty_shard_keeps_the_manifest(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"artifacts": ["the full release"]}')
    before = sorted(p.name for p in out.iterdir())
    result = CliRunner().invoke(cli, ["release", str(cfg), "--shard", "5/5"])
    assert result.exit_code == 0, result.stderr
    assert "shard 5/5 has no targets" in result.stderr
    assert (out / "manifest.json").read_text() == '{"artifacts": ["the full release"]}'
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "release.toml"]


def test_damaged_cache_is_rebuilt_with_a_note(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    out = tmp_path / "out"
    smolconvert.release(cfg)
    q8, f16 = out / "model-gguf-q8_0", out / "model-gguf-f16"

    def rerun() -> tuple[list[str], list[str]]:
        events: list[dict] = []
        result = smolconvert.release(cfg, events=events.append)
        assert sorted(a["name"] for a in result.manifest["artifacts"]) == [
            "gguf-f16",
            "gguf-q8_0",
        ]
        notes = [e["target"] for e in events if e["event"] == "cache_invalid"]
        return sorted(result.built), sorted(notes)

    (q8 / "artifact.json").write_text("[]")
    gguf_file = next(f16.glob("*.gguf"))
    data = bytearray(gguf_file.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor: same size, different bytes
    gguf_file.write_bytes(bytes(data))
    assert rerun() == (["gguf-f16", "gguf-q8_0"], ["gguf-f16", "gguf-q8_0"])

    (q8 / "artifact.json").write_text('{"files": 5}')
    meta = (f16 / "artifact.json").read_text()
    kld = json.loads(meta)["validation"]["quality"]["kld_mean"]
    last = repr(kld)[-1]  # flip one bit of the last digit of a measured metric
    flipped = meta.replace(repr(kld), repr(kld)[:-1] + chr(ord(last) ^ 1), 1)
    assert flipped != meta
    (f16 / "artifact.json").write_text(flipped)
    assert rerun() == (["gguf-f16", "gguf-q8_0"], ["gguf-f16", "gguf-q8_0"])
    assert rerun() == ([], [])  # and what was rebuilt is trusted again


def test_damaged_reference_latency_cache_is_measured_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smolconvert import release_pipeline as R
    from smolconvert.validators import validate as V
    from smolconvert.validators.quality import load_eval_text

    cfg = load_config(small_config(tmp_path))
    cfg.out.mkdir()
    model = smolconvert.load(cfg.source)
    text = load_eval_text(None)
    measured: list[float] = []

    class Timing:
        def __init__(self, value: float) -> None:
            self.value = value

        def to_dict(self) -> dict:
            return {"decode_tok_s": self.value}

    def fake_measure(model, windows, threads):  # noqa: ANN001, ANN202
        measured.append(100.0 + len(measured))
        return Timing(measured[-1])

    monkeypatch.setattr(V, "measure_reference_latency", fake_measure)
    events: list[dict] = []
    progress = R._Progress(True, events.append)
    first = R._reference_latency(cfg, model, text, "code", progress)
    assert R._reference_latency(cfg, model, text, "code", progress) == first  # cached
    path = cfg.out / R.REFERENCE_FILE
    good = path.read_text()
    for damaged in (good[: len(good) // 2], good.replace("100.0", "101.0"), "[]"):
        path.write_text(damaged)
        again = R._reference_latency(cfg, model, text, "code", progress)
        assert again == {"decode_tok_s": measured[-1]} and measured[-1] > 100.0
    assert len(measured) == 4
    assert [e["event"] for e in events].count("cache_invalid") == 3


SLOW_RELEASE = """
import sys, time
from pathlib import Path
import smolconvert.artifact as A
real, go = A.finish, Path(sys.argv[1])
def slow(stage, meta):  # hold the first staging folder open until the test says go
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return real(stage, meta)
A.finish = slow
from smolconvert.cli import cli
cli.main(args=sys.argv[2:], prog_name="smolconvert")
"""


def test_parallel_releases_on_one_config(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from smolconvert.artifact import Artifact

    cfg = small_config(tmp_path)
    out, go = tmp_path / "out", tmp_path / "go"
    root = Path(__file__).resolve().parents[1]
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_RELEASE, str(go), "release", str(cfg)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(".partial-" in p.name for p in out.iterdir())):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.02)
    # the first release is mid-export: start a second on the same config
    second = subprocess.Popen(
        [sys.executable, "-m", "smolconvert.cli", "release", str(cfg)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    second_err = []
    while line := second.stderr.readline():  # until it waits for the lock, or ends
        second_err.append(line)
        if "waiting for another smolconvert process" in line:
            break
    go.touch()
    second_err.append(second.communicate(timeout=300)[1])
    first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err
    assert second.returncode == 0, second_err
    assert "waiting for another smolconvert process" in "".join(second_err)
    assert "built 0, validated 0" in "".join(second_err)  # it found the first one's work done
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(a["name"] for a in manifest["artifacts"]) == ["gguf-f16", "gguf-q8_0"]
    for a in manifest["artifacts"]:
        Artifact.load(out / a["folder"], hashes=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and "partial" in p.name]


def test_release_refuses_non_finite_weights_before_building(tmp_path: Path) -> None:
    from tests.model.test_weights import with_non_finite

    cfg = tiny.config("llama", hidden_size=256, intermediate_size=512)
    tiny.write_folder(tmp_path / "model", cfg, tensors=with_non_finite(cfg))
    config = write_config(tmp_path)
    result = CliRunner().invoke(cli, ["release", str(config)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NaN or infinite values" in errors[0]
    assert not (tmp_path / "out" / "manifest.json").exists()
    # allow_nonfinite skips the check; then the quantizer itself refuses what it cannot store
    config.write_text(
        config.read_text().replace("[release]\n", "[release]\nallow_nonfinite = true\n")
    )
    again = CliRunner().invoke(cli, ["release", str(config)])
    assert again.exit_code == 2 and "a quantized type cannot represent them" in again.stderr
