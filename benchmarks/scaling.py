"""Export time and peak memory at every SmolLM size, one fresh process per export.

    python benchmarks/scaling.py [--sizes 135m,360m,1.7b,3b] [--targets gguf:q8_0,onnx:int4]
        [--work DIR] [--json FILE] [--timeout SECONDS] [--option TARGET:KEY=VALUE] [--report]

1. For each size, writes a folder laid out like the published checkpoint (its config.json,
   tokenizer and generation config from tests/published.py; random bf16 weights, std 0.02,
   seeded; one model.safetensors for the SmolLM2 sizes, two shards and model.safetensors.index.json
   for SmolLM3-3B, as on the Hub). A folder is built once and kept in the work folder.
2. For each target, one at a time (the machine has 2 cores: never two exports at once), runs
   `python -m smolconvert.cli export FOLDER --to TARGET -o OUT` in a fresh child process, reads
   its peak RSS from os.wait4 (the kernel's high-water mark: anonymous and file-backed pages,
   the mmap'd safetensors included), samples /proc/PID/status to say which export step held the
   peak and how much of it was file-backed, then deletes the export. An export is stopped after
   --timeout seconds, when its RSS passes --rss-cap-mb, or when the machine is nearly out of
   memory (no swap here: the OOM killer might pick someone else's process); the row says so and
   keeps the peak reached. --profile samples each export with py-spy (if installed) and lists
   where its main thread spent its time; a stopped export gets a py-spy dump with locals (e.g.
   the GPTQ layer it had reached).
3. Prints a markdown table and merges the rows into the JSON file (keyed by size and target, so
   sizes can be measured in separate runs). `--report` only prints the table of the JSON file.

Bounds (issue 18): gguf and mlc exports stream, peak RSS <= 0.75 x the fp32 weight bytes
(4 x n_params) at 1.7B and 3B; onnx and coreml <= 1.3 x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/published.py: the published configs and folder writer

# size key -> the published checkpoint whose shape and layout the folder copies
CHECKPOINTS = {
    "135m": "SmolLM2-135M-Instruct",
    "360m": "SmolLM2-360M-Instruct",
    "1.7b": "SmolLM2-1.7B-Instruct",
    "3b": "SmolLM3-3B",
}
# the default scheme(s) of every family
TARGETS = ("gguf:q8_0", "gguf:q4_k_m", "onnx:fp32", "onnx:int4", "coreml:int4", "mlc:q4f16_1")
# peak RSS / fp32 weight bytes, by family; checked at the sizes the issue names
BOUNDS = {"gguf": 0.75, "mlc": 0.75, "onnx": 1.3, "coreml": 1.3}
BOUND_SIZES = ("1.7b", "3b")
SAMPLE_S = 0.25
TIMELINE_S = 2.0
MIN_AVAILABLE_MB = 1536


@dataclass
class Row:
    size: str
    target: str
    checkpoint: str
    n_params: int
    fp32_bytes: int
    status: str  # ok | failed (exit code) | timeout N s | over RSS cap N MB
    seconds: float
    cpu_s: float  # the child's user + system CPU time: less sensitive to other users of the cores
    load_avg: float  # mean 1-minute load average while it ran (2 cores: above 2 means contention)
    peak_rss_mb: float  # os.wait4 ru_maxrss: the child's high-water mark
    ratio: float  # peak RSS / fp32 weight bytes
    bound: float | None  # the bound at this size, None where it names none
    met: bool | None
    out_mb: float | None  # the export's size on disk
    peak_step: str  # the export step during which the sampled RSS was highest
    peak_file_mb: float  # file-backed part (RssFile) of that sample: mmap'd inputs and outputs
    peak_anon_mb: float  # anonymous part (RssAnon) of the highest anonymous sample
    options: dict[str, str] = field(default_factory=dict)
    code: str = ""  # code_version() when the export started
    steps: list[str] = field(default_factory=list)  # the child's step lines, with elapsed time
    error: str = ""
    stack: str = ""  # py-spy dump when the harness stopped the child (if py-spy is installed)
    profile: list[str] = field(default_factory=list)  # --profile: where the main thread was
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (s, RSS MB, anon MB)


# ---------------------------------------------------------------------------------- the folders


def build_folder(size: str, work: Path) -> Path:
    """The published-layout folder of `size` in `work`, built once (a marker says it is whole)."""
    from tests import published

    folder = work / "models" / CHECKPOINTS[size]
    done = folder / ".complete"
    if done.exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    print(f"building {folder} (random bf16 weights)", file=sys.stderr, flush=True)
    published.write_published(folder, CHECKPOINTS[size], size="full", seed=0, std=0.02)
    done.write_text(f"{time.perf_counter() - start:.1f} s\n")
    print(f"built {folder} in {done.read_text().strip()}", file=sys.stderr, flush=True)
    return folder


def n_params(folder: Path) -> int:
    """Parameters stored in the folder's safetensors files, from their headers (tied weights are
    stored once, so they count once)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                total += n
    return total


# ---------------------------------------------------------------------------------- one export


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of a live process in kB (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _py_spy(pid: int) -> str:
    exe = shutil.which("py-spy")
    if exe is None:
        return ""
    try:
        done = subprocess.run(
            [exe, "dump", "--locals", "--pid", str(pid)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout[:20000]  # with locals: e.g. which layer a GPTQ run had reached


def code_version() -> str:
    """The smolconvert sources measured: HEAD, and a digest of smolconvert/*.py when the tree
    differs from it (several people edit the tree; a row must say which code it timed)."""
    import hashlib

    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "smolconvert"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if not dirty:
        return head or "unknown"
    h = hashlib.sha256()
    for path in sorted((ROOT / "smolconvert").rglob("*.py")):
        h.update(path.read_bytes())
    return f"{head}+edits:{h.hexdigest()[:8]}"


def mem_available_mb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _profile_summary(path: Path, top: int = 10) -> list[str]:
    """Share of the main thread's samples per innermost smolconvert function (py-spy raw)."""
    counts: dict[str, int] = {}
    total = 0
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or not frames[0].startswith("_run_module_as_main"):
            continue  # other threads (tqdm's monitor, torch's pools)
        ours = [f for f in frames if "smolconvert/" in f]
        where = ours[-1] if ours else frames[-1]
        func, _, loc = where.partition(" (")
        key = f"{func} ({loc.split(':')[0]})"
        counts[key] = counts.get(key, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [f"{100 * n / total:5.1f}% {key}" for key, n in ranked]


def measure(
    folder: Path,
    size: str,
    target: str,
    out: Path,
    timeout: float,
    options: dict[str, str],
    rss_cap_mb: float,
    profile: Path | None = None,
) -> Row:
    """Export `folder` to `target` in a fresh child; its time and memory. The child is stopped
    after `timeout` seconds or when its RSS passes `rss_cap_mb` (the machine has no swap, and an
    out-of-memory kill could take another user's process instead)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "smolconvert.cli", "export", str(folder), "--to", target]
    cmd += ["-o", str(out)]
    for key, value in options.items():
        cmd += ["-O", f"{key}={value}"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    code = code_version()
    start = time.perf_counter()
    # own session, so a timeout ends this child and whatever it started, and nothing else
    child = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    steps: list[str] = []
    tail: list[str] = []
    step = ["(start)"]
    peak = {"VmRSS": 0, "RssFile": 0, "RssAnon": 0, "step": "(start)"}
    loads: list[float] = []
    timeline: list[tuple[float, int, int]] = []  # (s, RSS MB, anonymous MB) every TIMELINE_S

    def read_stderr() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            line = line.rstrip()
            tail.append(line)
            del tail[:-30]
            if line.startswith("["):  # progress.Steps: "[  12.3s] message"
                steps.append(line)
                step[0] = line
                print(f"    {line}", file=sys.stderr, flush=True)

    stopped = [""]  # why the harness stopped the child, if it did
    stack = [""]

    def stop(reason: str) -> None:
        if child.returncode is None and not stopped[0]:
            stopped[0] = reason
            stack[0] = _py_spy(child.pid)
            try:
                os.killpg(
                    child.pid, signal.SIGKILL if reason.startswith("over") else signal.SIGTERM
                )
            except ProcessLookupError:
                pass

    def sample() -> None:
        while child.returncode is None:
            s = _status(child.pid)
            if not s:
                break
            if s.get("VmRSS", 0) > peak["VmRSS"]:
                peak.update(VmRSS=s["VmRSS"], RssFile=s.get("RssFile", 0), step=step[0])
            peak["RssAnon"] = max(peak["RssAnon"], s.get("RssAnon", 0))
            loads.append(os.getloadavg()[0])
            now = time.perf_counter() - start
            if not timeline or now - timeline[-1][0] >= TIMELINE_S:
                timeline.append((round(now, 1), s["VmRSS"] // 1024, s.get("RssAnon", 0) // 1024))
            if s.get("VmRSS", 0) / 1024 > rss_cap_mb:
                stop(f"over RSS cap {rss_cap_mb:.0f} MB")
            elif (
                mem_available_mb() < MIN_AVAILABLE_MB
            ):  # others' use grew: yield before the OOM killer
                stop(f"over RSS cap (machine down to {MIN_AVAILABLE_MB} MB available)")
            time.sleep(SAMPLE_S)

    def watchdog() -> None:
        stop(f"timeout {timeout:.0f} s")

    threads = [threading.Thread(target=read_stderr, daemon=True)]
    threads.append(threading.Thread(target=sample, daemon=True))
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, watchdog)
    timer.start()
    spy = None
    if profile is not None and shutil.which("py-spy"):
        # 5 samples a second: cheap next to the export; ends when the child does
        spy = subprocess.Popen(
            [shutil.which("py-spy") or "py-spy", "record", "--pid", str(child.pid), "-r", "5"]
            + ["-f", "raw", "-o", str(profile)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    timer.cancel()
    seconds = time.perf_counter() - start
    if spy is not None:
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.terminate()
    for t in threads:
        t.join(timeout=5)
    stdout = child.stdout.read() if child.stdout else ""
    peak_mb = usage.ru_maxrss / 1024  # kB on Linux
    n = n_params(folder)
    family = target.split(":")[0]
    bound = BOUNDS.get(family) if size in BOUND_SIZES else None
    ratio = peak_mb * 2**20 / (4 * n)
    if stopped[0]:
        state = stopped[0]
    elif child.returncode == -signal.SIGKILL:
        state = "killed (SIGKILL: out of memory?)"  # not by us: the kernel's OOM killer, see dmesg
    elif child.returncode != 0:
        state = f"failed ({child.returncode})"
    else:
        state = "ok"
    out_mb = None
    if out.exists():
        out_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
        shutil.rmtree(out)  # disk: a 3B export is several GB
    return Row(
        size=size,
        target=target,
        checkpoint=CHECKPOINTS[size],
        n_params=n,
        fp32_bytes=4 * n,
        status=state,
        seconds=round(seconds, 1),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
        load_avg=round(sum(loads) / max(len(loads), 1), 2),
        peak_rss_mb=round(peak_mb, 1),
        ratio=round(ratio, 3),
        bound=bound,
        met=verdict(bound, ratio, state),
        out_mb=None if out_mb is None else round(out_mb, 1),
        peak_step=peak["step"],
        peak_file_mb=round(peak["RssFile"] / 1024, 1),
        peak_anon_mb=round(peak["RssAnon"] / 1024, 1),
        options=options,
        code=code,
        steps=steps,
        error="" if state == "ok" else "\n".join(tail[-12:]) + stdout[-2000:],
        stack=stack[0],
        profile=_profile_summary(profile) if profile is not None else [],
        timeline=timeline,
    )


# ---------------------------------------------------------------------------------- the table


def verdict(bound: float | None, ratio: float, state: str) -> bool | None:
    """Bound met? An export stopped early has met nothing, but one already past the bound when it
    stopped has missed it."""
    if bound is None:
        return None
    if ratio > bound:
        return False
    return True if state == "ok" else None


def table(rows: list[dict[str, Any]]) -> str:
    order = {s: i for i, s in enumerate(CHECKPOINTS)}
    rows = sorted(
        rows,
        key=lambda r: (
            order.get(r["size"], 99),
            TARGETS.index(r["target"]) if r["target"] in TARGETS else 99,
            json.dumps(r.get("options", {}), sort_keys=True),
        ),
    )
    lines = [
        "| model shape | params | target | status | export s | CPU s | load | peak RSS MB "
        "| of which file MB "
        "| peak / fp32 bytes | bound | met | out MB | step at peak |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        target = r["target"]
        if r.get("options"):
            target += " " + " ".join(f"{k}={v}" for k, v in sorted(r["options"].items()))
        met = {True: "yes", False: "**no**", None: "-"}[
            verdict(r["bound"], r["ratio"], r["status"])
        ]
        step = r["peak_step"].split("] ", 1)[-1][:60]
        lines.append(
            f"| {r['checkpoint']} | {r['n_params'] / 1e9:.3f} B | {target} | {r['status']} "
            f"| {r['seconds']:.0f} | {_num(r.get('cpu_s'), '.0f')} "
            f"| {_num(r.get('load_avg'), '.1f')} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_file_mb']:.0f} "
            f"| {r['ratio']:.2f} | {r['bound'] if r['bound'] is not None else '-'} | {met} "
            f"| {r['out_mb'] if r['out_mb'] is not None else '-'} | {step} |"
        )
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)  # rows from before the field existed


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def save_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    meta = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _key(r: dict[str, Any]) -> tuple[str, str, str]:
    return r["size"], r["target"], json.dumps(r.get("options", {}), sort_keys=True)


def _options(given: list[str]) -> dict[str, dict[str, str]]:
    """--option TARGET:KEY=VALUE (or FAMILY:KEY=VALUE) -> {target or family: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in given:
        head, sep, value = item.rpartition("=")
        where, _, key = head.rpartition(":")
        if not sep or not where or not key:
            raise SystemExit(
                f"--option takes TARGET:KEY=VALUE (e.g. onnx:int4:layout=genai): {item}"
            )
        out.setdefault(where, {})[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--sizes",
        default=",".join(CHECKPOINTS),
        help=f"comma-separated, of {', '.join(CHECKPOINTS)} [default: all]",
    )
    ap.add_argument(
        "--targets", default=",".join(TARGETS), help="comma-separated [default: %(default)s]"
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache/smolconvert/bench-scaling",
        help="folder for the model folders (kept) and exports (deleted) [default: %(default)s]",
    )
    ap.add_argument(
        "--json", type=Path, default=None, help="results file [default: WORK/scaling.json]"
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds before an export is stopped and recorded as a timeout [default: %(default)s]",
    )
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="TARGET:KEY=VALUE",
        help="exporter option for a target or family (repeatable), e.g. onnx:layout=genai",
    )
    ap.add_argument(
        "--rss-cap-mb",
        type=float,
        default=None,
        help="stop an export whose RSS passes this [default: available memory at its start "
        "less 2 GB]",
    )
    ap.add_argument("--report", action="store_true", help="print the table of --json and stop")
    ap.add_argument("--build-only", action="store_true", help="write the model folders and stop")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="sample each export with py-spy (5 Hz) into WORK/profiles and summarise by function",
    )
    ap.add_argument(
        "--drop-folders", action="store_true", help="delete each model folder after its size"
    )
    args = ap.parse_args()
    json_path = args.json or args.work / "scaling.json"
    if args.report:
        print(table(load_rows(json_path)))
        return
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [s for s in sizes if s not in CHECKPOINTS]
    if unknown:
        raise SystemExit(
            f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(CHECKPOINTS)}"
        )
    options = _options(args.option)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = load_rows(json_path)
    measured = []
    for size in sizes:
        folder = build_folder(size, args.work)
        if args.build_only:
            continue
        for target in targets:
            opts = options.get(target.split(":")[0], {}) | options.get(target, {})
            out = args.work / "exports" / f"{size}-{target.replace(':', '-')}"
            out.parent.mkdir(exist_ok=True)
            cap = args.rss_cap_mb or mem_available_mb() - 2048
            prof = None
            if args.profile:
                prof = args.work / "profiles" / f"{out.name}.txt"
                prof.parent.mkdir(exist_ok=True)
            row = asdict(measure(folder, size, target, out, args.timeout, opts, cap, prof))
            rows = [r for r in rows if _key(r) != _key(row)] + [row]
            measured.append(row)
            save_rows(json_path, rows)
            print(
                f"{size} {target}: {row['status']}, {row['seconds']:.0f} s, "
                f"peak {row['peak_rss_mb']:.0f} MB ({row['ratio']:.2f} x fp32)",
                file=sys.stderr,
                flush=True,
            )
        if args.drop_folders:
            shutil.rmtree(folder)
    print(table(measured))
    print(f"\nall rows: {json_path}", file=sys.stderr)
    # this process never loads a model itself: its own peak says the harness stayed small
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"harness peak RSS {own:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
