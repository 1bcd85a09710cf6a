"""The CI examples (examples/ci/) build the release their config describes: the matrix holds every
shard of it, the Core ML shards and only they run on macOS, the merge job waits for every shard,
the Linux install is the README's, and every `smolconvert` command line in them parses with the
real CLI (parsed only: nothing is exported)."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest

from smolconvert.cli import cli
from smolconvert.release_config import ReleaseConfig, load_config, parse_shard

yaml = pytest.importorskip("yaml", reason="pyyaml is missing: pip install pyyaml (the dev extra)")

ROOT = Path(__file__).parent.parent
GITHUB = ROOT / "examples" / "ci" / "github-actions-release.yml"
GITLAB = ROOT / "examples" / "ci" / "gitlab-ci-release.yml"
# The Core ML exports are stateful (iOS 18 / macOS 15, exporters/coreml.py min_runtime).
MIN_MACOS = 15
GITLAB_KEYWORDS = {
    "stages",
    "variables",
    "workflow",
    "default",
    "include",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
}


# --- reading the command lines -------------------------------------------------------------------


def smolconvert_commands(script: str) -> list[list[str]]:
    """The arguments of every `smolconvert ...` command in a shell script, as the shell splits
    them (quotes removed, variables left as `$NAME`), up to the next operator or redirection."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        if "smolconvert" not in line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if set(token) <= set("&|;<>()"):
                if segment[:1] == ["smolconvert"]:
                    out.append(segment[1:])
                segment = []
            else:
                segment.append(token)
    return out


def expand(token: str, variables: dict[str, str], where: str) -> str:
    """`$NAME` and `${NAME}` replaced as the shell would; a variable nobody sets fails the test."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            pytest.fail(f"{where}: ${name} is not set by the example (have {sorted(variables)})")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, token)


def parse_cli(args: list[str]) -> click.Context:
    """The context of the command `args` reach in the real CLI, parsed (never invoked) the way
    click's Group.invoke resolves subcommands; bad options or arguments raise click.UsageError."""
    command: click.Command = cli
    name, parent = "smolconvert", None
    while True:
        ctx = command.make_context(name, list(args), parent=parent, resilient_parsing=False)
        if not isinstance(command, click.Group):
            return ctx
        # click >= 8.2 keeps the subcommand's name in _protected_args (protected_args warns)
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        rest = [*protected, *ctx.args]
        if not rest:
            raise click.UsageError(f"{ctx.command_path} needs a subcommand", ctx)
        found, sub, args = command.resolve_command(ctx, rest)
        assert found is not None and sub is not None
        command, name, parent = sub, found, ctx


def command_name(ctx: click.Context) -> str:
    return ctx.command_path.removeprefix("smolconvert ")


def check_commands(
    found: list[tuple[str, list[str]]], config: Path
) -> dict[str, list[click.Context]]:
    """Each command parsed; all failures reported together. Returns the contexts by command."""
    by_name: dict[str, list[click.Context]] = {}
    failures = []
    for where, args in found:
        try:
            ctx = parse_cli(args)
        except click.UsageError as e:
            failures.append(f"{where}: smolconvert {shlex.join(args)}: {e.format_message()}")
            continue
        by_name.setdefault(command_name(ctx), []).append(ctx)
    assert not failures, "\n".join(failures)
    for ctx in by_name.get("release run", []):
        assert (ROOT / ctx.params["config"]).resolve() == config.resolve(), ctx.params
        assert (ROOT / ctx.params["config"]).is_file()
    return by_name


def readme_install() -> str:
    """The README Quick start's first line up to its `smolconvert release`: the install."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Quick start", 1)[1].split("```", 2)[1]
    first = block.strip().splitlines()[0]
    install, sep, _ = first.partition(" && smolconvert release")
    assert sep, f"the README's Quick start line changed shape: {first}"
    return install


def check_routing(entries: list[tuple[str, str, bool]], cfg: ReleaseConfig) -> None:
    """(shard, target, on macOS) per job: exactly shards 1/n..n/n, n = the number of targets (one
    target per shard is what lets a shard be routed), each its target, Core ML on macOS only."""
    shards = [parse_shard(shard) for shard, _, _ in entries]
    counts = {n for _, n in shards}
    assert len(counts) == 1, f"shards out of different totals: {sorted(counts)}"
    (n,) = counts
    assert sorted(i for i, _ in shards) == list(range(1, n + 1))
    assert n == len(cfg.targets), (
        f"{n} shards for {len(cfg.targets)} targets: with fewer shards than targets a shard mixes "
        "families and cannot go to the one runner its targets need"
    )
    for (shard, target, on_mac), (i, _) in zip(entries, shards, strict=True):
        (built,) = cfg.shard(i, n)
        assert target == built.name, f"shard {shard} builds {built.name}, the example says {target}"
        assert on_mac == (built.family == "coreml"), (
            f"shard {shard} ({built.target}) on_mac={on_mac}"
        )


@pytest.fixture(scope="module")
def readme() -> str:
    return readme_install()


# --- GitHub Actions -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def github() -> dict[str, Any]:
    return yaml.safe_load(GITHUB.read_text(encoding="utf-8"))


def github_matrix(job: dict[str, Any]) -> list[dict[str, Any]]:
    matrix = (job.get("strategy") or {}).get("matrix") or {}
    assert set(matrix) <= {"include"}, "the shard matrix names each entry in include"
    return list(matrix.get("include", []))


def github_shard_jobs(workflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    jobs = workflow["jobs"]
    return {
        name: job for name, job in jobs.items() if any("shard" in e for e in github_matrix(job))
    }


def github_expressions(text: str, matrix: dict[str, Any], env: dict[str, str], where: str) -> str:
    """`${{ matrix.X }}` and `${{ env.X }}` replaced as Actions does before the shell runs."""

    def value(m: re.Match[str]) -> str:
        scope, name = m.group(1), m.group(2)
        values = matrix if scope == "matrix" else env
        if name not in values:
            pytest.fail(f"{where}: ${{{{ {scope}.{name} }}}} is not set")
        return str(values[name])

    return re.sub(r"\$\{\{\s*(matrix|env)\.(\w+)\s*\}\}", value, text)


def github_commands(workflow: dict[str, Any]) -> list[tuple[str, list[str]]]:
    found = []
    for name, job in workflow["jobs"].items():
        for entry in github_matrix(job) or [{}]:
            for n, step in enumerate(job["steps"]):
                if "run" not in step:
                    continue
                where = f"{GITHUB.name} job {name} step {n + 1} {entry}"
                env = {**workflow.get("env", {}), **job.get("env", {}), **step.get("env", {})}
                script = github_expressions(step["run"], entry, env, where)
                for args in smolconvert_commands(script):
                    assert not any("${{" in a for a in args), f"{where}: unresolved {args}"
                    found.append((where, [expand(a, env, where) for a in args]))
    return found


def test_github_matrix_has_every_shard_and_sends_core_ml_to_macos(github: dict[str, Any]) -> None:
    cfg = load_config(ROOT / github["env"]["CONFIG"])
    jobs = github_shard_jobs(github)
    assert jobs, "no job with a shard matrix"
    entries = []
    for job in jobs.values():
        assert job["runs-on"] == "${{ matrix.os }}"
        for e in github_matrix(job):
            on_mac = e["os"].startswith("macos")
            if on_mac:
                version = re.fullmatch(r"macos-(\d+)", e["os"])
                assert version and int(version.group(1)) >= MIN_MACOS, e
            else:
                assert e["os"].startswith("ubuntu"), e
            entries.append((e["shard"], e["target"], on_mac))
    check_routing(entries, cfg)


def test_github_merge_needs_every_shard_job_and_merges_the_config_output(
    github: dict[str, Any],
) -> None:
    cfg = load_config(ROOT / github["env"]["CONFIG"])
    assert (ROOT / github["env"]["OUT"]).resolve() == cfg.out
    shard_jobs = set(github_shard_jobs(github))
    merges = [
        name
        for name, job in github["jobs"].items()
        if any("release merge" in step.get("run", "") for step in job["steps"])
    ]
    assert merges, "no job runs smolconvert release merge"
    for name in merges:
        needs = github["jobs"][name].get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        assert shard_jobs <= set(needs), f"{name} needs {needs}, not every shard job {shard_jobs}"
    for name in shard_jobs:
        uploads = [
            s for s in github["jobs"][name]["steps"] if "upload-artifact" in s.get("uses", "")
        ]
        assert [s["with"]["path"] for s in uploads] == ["${{ env.OUT }}"], uploads


def test_github_commands_parse_with_the_cli(github: dict[str, Any], readme: str) -> None:
    config = ROOT / github["env"]["CONFIG"]
    found = github_commands(github)
    by_name = check_commands(found, config)
    shards = sorted(ctx.params["shard"] for ctx in by_name.get("release run", []))
    expected = sorted(
        e["shard"] for job in github_shard_jobs(github).values() for e in github_matrix(job)
    )
    assert shards == expected, "one `release CONFIG --shard` per matrix entry"
    assert by_name.get("release merge"), "no `release merge` command"
    cfg = load_config(config)
    for ctx in by_name.get("inspect", []):  # the cache key hashes the config's own source
        source = ctx.params["source"]
        assert cfg.source in (source, str((ROOT / source).resolve())), (source, cfg.source)
    runs = [s.get("run", "") for j in github_shard_jobs(github).values() for s in j["steps"]]
    assert any(readme in run for run in runs), "the Linux install is not the README's"


# --- GitLab CI ------------------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """GitLab's `extends`: mappings merged key by key, everything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def gitlab() -> dict[str, Any]:
    return yaml.safe_load(GITLAB.read_text(encoding="utf-8"))


def gitlab_jobs(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def resolved(job: dict[str, Any]) -> dict[str, Any]:
        parents = job.get("extends", [])
        parents = [parents] if isinstance(parents, str) else parents
        merged: dict[str, Any] = {}
        for parent in parents:
            merged = deep_merge(merged, resolved(pipeline[parent]))
        return deep_merge(merged, {k: v for k, v in job.items() if k != "extends"})

    return {
        name: resolved(job)
        for name, job in pipeline.items()
        if name not in GITLAB_KEYWORDS and not name.startswith(".")
    }


def gitlab_matrix(job: dict[str, Any]) -> list[dict[str, str]]:
    """Every job a `parallel: matrix` makes (lists of values multiply), or one empty entry."""
    entries = []
    for row in (job.get("parallel") or {}).get("matrix", []):
        lists = {k: v if isinstance(v, list) else [v] for k, v in row.items()}
        entries += [
            dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())
        ]
    return entries or [{}]


def gitlab_shard_jobs(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    jobs = gitlab_jobs(pipeline)
    return {
        name: job for name, job in jobs.items() if any("SHARD" in e for e in gitlab_matrix(job))
    }


def gitlab_commands(pipeline: dict[str, Any]) -> list[tuple[str, list[str]]]:
    found = []
    for name, job in gitlab_jobs(pipeline).items():
        for entry in gitlab_matrix(job):
            variables = {**pipeline.get("variables", {}), **job.get("variables", {}), **entry}
            variables = {k: str(v) for k, v in variables.items()}
            for key in ("before_script", "script", "after_script"):
                for n, line in enumerate(job.get(key, [])):
                    where = f"{GITLAB.name} job {name} {key} line {n + 1} {entry}"
                    for args in smolconvert_commands(line):
                        found.append((where, [expand(a, variables, where) for a in args]))
    return found


def test_gitlab_matrices_have_every_shard_and_send_core_ml_to_macos(gitlab: dict[str, Any]) -> None:
    cfg = load_config(ROOT / gitlab["variables"]["CONFIG"])
    entries = []
    for job in gitlab_shard_jobs(gitlab).values():
        image = job.get("image", "")
        on_mac = image.startswith("macos-")
        if on_mac:
            version = re.match(r"macos-(\d+)", image)
            assert version and int(version.group(1)) >= MIN_MACOS, image
            assert any("macos" in tag for tag in job.get("tags", [])), job.get("tags")
        entries += [(e["SHARD"], e["TARGET"], on_mac) for e in gitlab_matrix(job)]
    check_routing(entries, cfg)


def test_gitlab_merge_needs_every_shard_job_and_caches_name_real_files(
    gitlab: dict[str, Any],
) -> None:
    cfg = load_config(ROOT / gitlab["variables"]["CONFIG"])
    assert (ROOT / gitlab["variables"]["OUT"]).resolve() == cfg.out
    jobs = gitlab_jobs(gitlab)
    shard_jobs = set(gitlab_shard_jobs(gitlab))
    assert shard_jobs, "no job with a SHARD matrix"
    merges = [n for n, j in jobs.items() if any("release merge" in s for s in j.get("script", []))]
    assert merges, "no job runs smolconvert release merge"
    for name in merges:
        needs = {n if isinstance(n, str) else n["job"] for n in jobs[name].get("needs", [])}
        assert shard_jobs <= needs, f"{name} needs {sorted(needs)}, not every shard job"
    for name, job in jobs.items():
        caches = job.get("cache", [])
        for cache in [caches] if isinstance(caches, dict) else caches:
            for path in cache["key"].get("files", []) if isinstance(cache["key"], dict) else []:
                assert (ROOT / path).is_file(), f"{name}: cache key file {path} does not exist"


def test_gitlab_commands_parse_with_the_cli(gitlab: dict[str, Any], readme: str) -> None:
    config = ROOT / gitlab["variables"]["CONFIG"]
    by_name = check_commands(gitlab_commands(gitlab), config)
    shards = sorted(ctx.params["shard"] for ctx in by_name.get("release run", []))
    expected = sorted(
        e["SHARD"] for job in gitlab_shard_jobs(gitlab).values() for e in gitlab_matrix(job)
    )
    assert shards == expected, "one `release CONFIG --shard` per matrix entry"
    assert by_name.get("release merge"), "no `release merge` command"
    installs = [
        line for job in gitlab_shard_jobs(gitlab).values() for line in job.get("before_script", [])
    ]
    assert readme in installs, "the Linux install is not the README's"


# --- the checks themselves can fail ---------------------------------------------------------------


def test_command_lines_are_split_as_the_shell_does() -> None:
    script = (
        'pip install x && smolconvert release "$CONFIG" \\\n  --shard "3/12" > log.txt\n'
        "# smolconvert in a comment is no command\n"
        "echo smolconvert; smolconvert release merge a b -o out | tee merged.txt\n"
    )
    assert smolconvert_commands(script) == [
        ["release", "$CONFIG", "--shard", "3/12"],
        ["release", "merge", "a", "b", "-o", "out"],
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["release", "examples/release-default.toml", "--shards", "1/2"],  # a renamed option
        ["release", "examples/release-default.toml", "--shard"],  # its value missing
        ["release", "merge", "a", "b"],  # -o is required
        ["release", "combine", "a", "-o", "out"],  # a missing subcommand is taken for a CONFIG
        ["releases", "examples/release-default.toml"],
    ],
)
def test_the_cli_check_refuses_what_the_cli_refuses(args: list[str]) -> None:
    with pytest.raises(click.UsageError):
        parse_cli(args)


def test_the_cli_check_reaches_the_release_commands() -> None:
    run = parse_cli(["release", "examples/release-default.toml", "--shard", "2/12", "--force"])
    assert command_name(run) == "release run"
    assert run.params["shard"] == "2/12" and run.params["force"] is True
    merge = parse_cli(["release", "merge", "a", "b", "-o", "out"])
    assert command_name(merge) == "release merge"
    assert [str(d) for d in merge.params["dirs"]] == ["a", "b"]
