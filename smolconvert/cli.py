"""The `smolconvert` command: argument parsing and printing over the Python API, nothing else.

User mistakes (SmolconvertError) print one line and exit 2; anything else is a bug: exit 1, with the
traceback under --debug. --json writes machine-readable results to stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import click

from smolconvert import api
from smolconvert.errors import SmolconvertError
from smolconvert.version import __version__

STRICT_HELP = (
    "Refuse config.json fields smolconvert does not know (default: warn, record them in "
    "artifact.json and go on)."
)


def _show_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    click.echo(f"warning: {_one_line(str(message))}", err=True)


def _one_line(text: str) -> str:
    """Messages from libraries (torch, safetensors) may span lines; the CLI prints one."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class _Group(click.Group):
    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Every user mistake, click's usage errors included, is one `error:` line and exit 2."""
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare group: its help, as click does
            click.echo(e.format_message())
            sys.exit(0)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.echo(f"error: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except SmolconvertError as e:
                click.echo(f"error: {_one_line(str(e))}", err=True)
                sys.exit(2)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except Exception as e:
                if ctx.params.get("debug"):
                    traceback.print_exc()
                else:
                    click.echo(
                        f"internal error (a bug in smolconvert): {type(e).__name__}: "
                        f"{_one_line(str(e))}; rerun with --debug for the traceback",
                        err=True,
                    )
                sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smolconvert")
@click.option("--debug", is_flag=True, help="Show tracebacks for internal errors.")
def cli(debug: bool) -> None:
    """Convert small language models for every device runtime and verify each artifact."""


@cli.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout.")
@click.option("--allow-pickle", is_flag=True, help="Load PyTorch pickle checkpoints (runs code).")
@click.option("--strict-config", is_flag=True, help=STRICT_HELP)
def inspect(source: str, as_json: bool, allow_pickle: bool, strict_config: bool) -> None:
    """Describe a model: architecture, sizes, tokenizer, special ids, where the weights came from.

    SOURCE is a Hugging Face model folder, a .gguf file, or 'default' (SmolLM2-135M).
    """
    model = api.load(source, allow_pickle=allow_pickle, strict_config=strict_config)
    info = model.describe()
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    s = model.spec
    tok = info["tokenizer"]
    lines = [
        f"{model.name}  ({s.architecture}, {info['n_params'] / 1e6:.1f}M parameters)",
        f"  origin:      {model.origin}",
        f"  layers:      {s.n_layers}, hidden {s.hidden_size}, ffn {s.intermediate_size}",
        f"  attention:   {s.n_heads} heads / {s.n_kv_heads} KV heads, head_dim {s.head_dim}, "
        f"rope theta {s.rope_theta:g}"
        + (f", no-RoPE layers {info['no_rope_layers']}" if info["no_rope_layers"] else ""),
        f"  vocab:       {s.vocab_size}, tied: {'yes' if s.tie_word_embeddings else 'no'}",
        f"  tokenizer:   {tok['model']} (pre {tok['pre']}), bos {tok['bos']}, eos {tok['eos']}, "
        f"unk {tok['unk']}, pad {tok['pad']}, add_bos {tok['add_bos']}, "
        f"chat template {'yes' if tok['chat_template'] else 'no'}",
        "  stored as:   " + ", ".join(f"{k} x{v}" for k, v in info["storage_types"].items()),
        "  files:       "
        + ", ".join(f"{f['path']} ({f['size_bytes'] / 1e6:.1f} MB)" for f in info["files"]),
    ]
    if model.ignored_config_fields:
        lines.append("  ignored:     " + ", ".join(model.ignored_config_fields))
    click.echo("\n".join(lines))


@cli.command()
@click.argument("source", required=False)
@click.option("--to", "to", metavar="FAMILY:SCHEME", help="Target, e.g. gguf:q4_k_m or gguf:q8_0.")
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder [default: <model>-<family>-<scheme>].",
)
@click.option(
    "--imatrix",
    is_flag=True,
    help="Weight quantization error by activation importance (built-in calibration).",
)
@click.option(
    "--imatrix-text",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="UTF-8 calibration text for the importance matrix (implies --imatrix).",
)
@click.option(
    "-O",
    "--option",
    "extra",
    multiple=True,
    metavar="KEY=VALUE",
    help="A target family's option, e.g. -O layout=genai for ONNX, -O size_mb=90 for gguf:auto "
    "(repeatable; `export --list` shows every option with its values).",
)
@click.option("--layout", default=None, hidden=True)  # 0.1 spellings of -O: one more release
@click.option("--kv-cache", default=None, hidden=True)
@click.option("--mlc-scales", default=None, hidden=True)
@click.option("--list", "list_schemes", is_flag=True, help="List every target with bits/weight.")
@click.option("--allow-pickle", is_flag=True, help="Load PyTorch pickle checkpoints (runs code).")
@click.option(
    "--allow-nonfinite", is_flag=True, help="Convert weights that hold NaN or infinities."
)
@click.option("--strict-config", is_flag=True, help=STRICT_HELP)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT even if it is not a smolconvert artifact (never the input model).",
)
@click.option(
    "--base-model",
    default=None,
    metavar="ORG/NAME",
    help="Hub repository the model card names as base_model [default: guessed from SOURCE].",
)
@click.option("--json", "as_json", is_flag=True, help="Print artifact.json to stdout.")
def export(
    source: str | None,
    to: str | None,
    list_schemes: bool,
    as_json: bool,
    layout: str | None,
    kv_cache: str | None,
    mlc_scales: str | None,
    extra: tuple[str, ...],
    **kwargs: Any,
) -> None:
    """Export SOURCE to a device format; the folder holds the files and artifact.json.

    SOURCE is a Hugging Face model folder, a .gguf file, or 'default' (SmolLM2-135M).
    Targets: gguf:<type> for llama.cpp (gguf:auto -O size_mb=MB picks a type per tensor within a
    budget), onnx:<precision> for onnxruntime / Transformers.js / onnxruntime-genai,
    coreml:<precision> for Core ML, mlc:<scheme> for MLC LLM.
    """
    if list_schemes:
        _list_targets(as_json)
        return
    if source is None or to is None:
        raise click.UsageError("give SOURCE and --to FAMILY:SCHEME (or --list)")
    options = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--option takes KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    for key, alias in (("layout", layout), ("kv_cache", kv_cache), ("mlc_scales", mlc_scales)):
        if alias is not None:
            flag = "--" + key.replace("_", "-")
            click.echo(f"warning: {flag} is now -O {key}={alias}; {flag} goes in 0.3", err=True)
            options.setdefault(key, alias)
    art = api.export(source, to=to, options=options, quiet=False, **kwargs)
    if as_json:
        click.echo(json.dumps(art.meta, indent=2, sort_keys=True))
        return
    types = Counter(art.meta.get("tensor_types", {}).values())
    click.echo(
        f"wrote {art.folder} ({art.size_bytes / 1e6:.1f} MB): "
        + ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))
    )


def _list_targets(as_json: bool) -> None:
    from smolconvert.options import option_choices, option_help
    from smolconvert.targets import FAMILIES

    rows = [r for f in FAMILIES.values() for r in f.describe()]
    options = [
        {
            "family": f.name,
            "option": key,
            "values": list(values),
            "help": option_help(f.options)[key],
        }
        for f in FAMILIES.values()
        for key, values in option_choices(f.options).items()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for r in rows:
        mixture = f"  ({', '.join(r['mixture'])})" if r.get("mixture") else ""
        bits = r["bits_per_weight"]
        size = f"{bits:5.2f} bits/weight" if bits is not None else "the budget you set"
        click.echo(f"{r['target']:<16} {size}{mixture}")
    for o in options:
        values = " | ".join(o["values"])
        click.echo(
            f"-O {o['option']}=  ({o['family']}) {values} (default {o['values'][0]}): {o['help']}"
        )


@cli.command()
@click.argument("source")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="bf16",
    show_default=True,
    help="Precision to run a model source in (ignored for artifacts).",
)
@click.option(
    "--eval-text",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="UTF-8 text to score [default: CPython's pydoc topics].",
)
@click.option(
    "--ctx",
    type=click.IntRange(8),
    default=512,
    show_default=True,
    help="Window length in tokens; the second half of each window is scored.",
)
@click.option(
    "--windows",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="How many windows to score.",
)
@click.option(
    "--latency/--no-latency",
    default=True,
    show_default=True,
    help="Also time a 128-token prompt and 128 decode steps (in a fresh process).",
)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads.")
@click.option("--allow-pickle", is_flag=True, help="Load PyTorch pickle checkpoints (runs code).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON to stdout.")
def validate(source: str, as_json: bool, **options: Any) -> None:
    """Measure an artifact (or a model in another precision) against the fp32 reference.

    SOURCE is an artifact folder written by `smolconvert export` (run in its own runtime, e.g.
    llama.cpp, against the model it was exported from), or a model source (a Hugging Face folder,
    a .gguf file or 'default') run in --dtype against its own fp32 self. Reports perplexity and its
    ratio to the reference, KL divergence (mean, p99, max), top-1 agreement, time to first token,
    decode tokens/s, peak RSS and size, all on the same tokens.
    """
    report = api.validate(source, quiet=False, **options)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return
    click.echo(_format_report(report))


def _format_report(report: Any) -> str:
    q = report.quality
    lines = [
        f"{report.model}: {report.candidate}",
        f"  against:     {report.reference}",
        f"  text:        {report.eval_text['name']}, {q.n_windows} windows x {q.ctx} tokens, "
        f"{q.n_scored} scored",
        f"  perplexity:  {q.ppl:.4f} (reference {q.ppl_reference:.4f}, ratio {q.ppl_ratio:.4f})",
        f"  KLD:         mean {q.kld_mean:.6f}, p99 {q.kld_p99:.6f}, max {q.kld_max:.6f}",
        f"  top-1:       {q.top1 * 100:.2f}% agreement",
    ]
    if report.size_bytes is not None:
        lines.append(f"  size:        {report.size_bytes / 1e6:.1f} MB")
    for label, lat in (("latency", report.latency), ("reference", report.reference_latency)):
        if lat is not None:
            lines.append(
                f"  {label + ':':<12} TTFT {lat.ttft_ms:.1f} ms ({lat.prompt_tokens} tokens), "
                f"decode {lat.decode_tok_s:.1f} tok/s, peak RSS {lat.peak_rss_mb:.0f} MB"
            )
    lines += [f"  note:        {n}" for n in report.notes]
    return "\n".join(lines)


class _DefaultGroup(_Group):
    """`release CONFIG` runs a release; `release merge DIR...` is the one other subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_DefaultGroup)
def release() -> None:
    """Build every target of a release config, validate and gate each, write manifest and report.

    \b
      smolconvert release CONFIG [--shard i/n] [--force] [--json-events]
      smolconvert release merge DIR... -o OUT

    Exit status: 0 when every artifact meets its budget, 3 when a gate fails (each failure is
    printed: target, metric, budget and value), 2 for a bad config or input.
    """


@release.command("run")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--shard", default=None, metavar="I/N", help="Build only shard I of N (stable).")
@click.option("--force", is_flag=True, help="Rebuild and re-measure even what is cached.")
@click.option("--json-events", is_flag=True, help="Emit one JSON line per step on stdout (for CI).")
def release_run(config: Path, shard: str | None, force: bool, json_events: bool) -> None:
    """Run the release described by CONFIG (TOML; see examples/release-default.toml)."""

    def emit(event: dict[str, Any]) -> None:
        click.echo(json.dumps(event, sort_keys=True))

    result = api.release(
        config, shard=shard, force=force, quiet=False, events=emit if json_events else None
    )
    _finish_release(result, json_events)


@release.command("merge")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path))
def release_merge(dirs: tuple[Path, ...], out: Path) -> None:
    """Join shard outputs (DIR...) into one release with one manifest and report in OUT."""
    _finish_release(api.merge_releases(list(dirs), out), json_events=False)


def _finish_release(result: Any, json_events: bool) -> None:
    if not result.manifest:  # an empty shard: nothing was built or written
        return
    if not json_events:
        click.echo((result.out / "report.md").read_text(encoding="utf-8"))
    click.echo(f"release: {result.out} in {result.wall_s:.0f} s", err=True)
    for f in result.failures:
        click.echo(f"gate failed: {f.message()}", err=True)
    if result.failures:
        sys.exit(3)


def main() -> None:
    cli(prog_name="smolconvert")


if __name__ == "__main__":
    main()
