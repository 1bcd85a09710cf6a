"""GGUF export and quantization: smolconvert vs llama.cpp's own path, same folder, same run.

    python benchmarks/gguf_vs_llama_cpp.py [--source default] [--windows 8] [--work DIR]

1. Writes the source as a Hugging Face folder (fp32 safetensors) so both tools start from the same
   files.
2. Times llama.cpp's converter (convert_hf_to_gguf.py from the llama-cpp-python 0.3.36 source
   distribution, fetched with pip into the work folder, never committed) to an f32 GGUF, and
   llama.cpp's quantizer (llama_model_quantize) to q4_k_m and iq4_nl.
3. Times `smolconvert export` to gguf:f32 and gguf:q4_k_m (plain and with --imatrix), gguf:iq4_nl
   with --imatrix, and gguf:auto at --auto-mb MB with --imatrix, from the same folder.
4. Compares per-tensor types and scores every quantized file in llama.cpp with smolconvert's
   quality protocol against the same fp32 reference; prints ratios (ours / theirs).

llama.cpp's imatrix files come from its llama-imatrix tool, which llama-cpp-python does not
ship; given the same importance matrix its quantizer writes the bytes our imatrix rows do (the
codecs are byte-identical to ggml_quantize_chunk with importance, tests/quantizers/test_oracle.py,
and the mixtures pick its types), so those rows stand for both.

Needs llama-cpp-python and sentencepiece (llama.cpp's converter imports it).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import gguf

import smolconvert
from smolconvert.model.hf_folder import save_hf_folder

SDIST = "llama-cpp-python==0.3.36"


def llama_cpp_source(work: Path) -> Path:
    root = work / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not root.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                SDIST,
                "-d",
                str(work),
                "-q",
            ],
            check=True,
        )
        with tarfile.open(next(work.glob("llama_cpp_python-0.3.36.tar.gz"))) as tar:
            tar.extractall(work, filter="data")
    return root


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/smolconvert/bench-gguf")
    ap.add_argument("--auto-mb", type=float, default=90.0, help="gguf:auto's size budget")
    args = ap.parse_args()
    import llama_cpp

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = smolconvert.load(args.source)
    hf = save_hf_folder(model, work / "hf")
    converter = llama_cpp_source(work) / "convert_hf_to_gguf.py"

    theirs_f32 = work / "llama-cpp-f32.gguf"
    _, t_convert = timed(
        subprocess.run,
        [sys.executable, str(converter), str(hf), "--outtype", "f32", "--outfile", str(theirs_f32)],
        check=True,
        capture_output=True,
    )
    theirs: dict[str, Path] = {}
    t_quant: dict[str, float] = {}
    for scheme, ftype in (
        ("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
        ("iq4_nl", llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL),
    ):
        theirs[scheme] = work / f"llama-cpp-{scheme}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        rc, t_quant[scheme] = timed(
            llama_cpp.llama_model_quantize,
            str(theirs_f32).encode(),
            str(theirs[scheme]).encode(),
            ctypes.byref(params),
        )
        assert rc == 0, f"llama_model_quantize {scheme} failed"

    ours_f32, t_ours_f32 = timed(smolconvert.export, hf, to="gguf:f32", out=work / "ours-f32")
    ours_q4, t_ours_q4 = timed(smolconvert.export, hf, to="gguf:q4_k_m", out=work / "ours-q4")
    ours_iq4, t_ours_iq4 = timed(
        smolconvert.export, hf, to="gguf:q4_k_m", imatrix=True, out=work / "ours-q4-imatrix"
    )
    ours_nl, t_ours_nl = timed(
        smolconvert.export, hf, to="gguf:iq4_nl", imatrix=True, out=work / "ours-iq4_nl-imatrix"
    )
    ours_nl_plain = smolconvert.export(hf, to="gguf:iq4_nl", out=work / "ours-iq4_nl")
    ours_auto, t_ours_auto = timed(
        smolconvert.export,
        hf,
        to="gguf:auto",
        options={"size_mb": args.auto_mb},
        imatrix=True,
        out=work / "ours-auto-imatrix",
    )

    def tensor_bytes(path: Path) -> dict[str, bytes]:
        return {t.name: t.data.tobytes() for t in gguf.GGUFReader(str(path)).tensors}

    def types(path: Path) -> dict[str, str]:
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

    same_types = {
        "q4_k_m": types(theirs["q4_k_m"]) == ours_q4.meta["tensor_types"],
        "iq4_nl": types(theirs["iq4_nl"]) == ours_nl_plain.meta["tensor_types"],
        "iq4_nl tensor bytes": tensor_bytes(theirs["iq4_nl"])
        == tensor_bytes(ours_nl_plain.path("model")),
    }

    # Score llama.cpp's files with the same protocol: wrap each as an artifact of the hf source.
    from smolconvert.artifact import file_entries, write_json

    their_arts = {}
    for scheme, path in theirs.items():
        folder = work / f"llama-cpp-{scheme}"
        folder.mkdir(exist_ok=True)
        (folder / "model.gguf").write_bytes(path.read_bytes())
        write_json(
            folder / "artifact.json",
            {
                "target": "gguf",
                "scheme": scheme,
                "source": str(hf),
                "source_sha256": smolconvert.load(hf).sha256,
                "entry_points": {"model": "model.gguf"},
                "files": file_entries(folder),
            },
        )
        their_arts[scheme] = folder
    reports = {}
    for name, folder in (
        ("llama.cpp q4_k_m", their_arts["q4_k_m"]),
        ("llama.cpp iq4_nl", their_arts["iq4_nl"]),
        ("ours q4_k_m", ours_q4.folder),
        ("ours q4_k_m imatrix", ours_iq4.folder),
        ("ours iq4_nl imatrix", ours_nl.folder),
        (f"ours auto {args.auto_mb:g}MB imatrix", ours_auto.folder),
    ):
        reports[name] = smolconvert.validate(folder, windows=args.windows, latency=False)

    print(f"\nsource: {model.name} ({model.origin})")
    print(
        f"export to f32 GGUF:  llama.cpp converter {t_convert:6.1f} s   ours {t_ours_f32:6.1f} s"
        f"   ratio ours/theirs {t_ours_f32 / t_convert:.2f}"
    )
    print(
        f"q4_k_m from folder:  llama.cpp convert+quantize {t_convert + t_quant['q4_k_m']:6.1f} s "
        f"(quantize alone {t_quant['q4_k_m']:.1f} s)   ours {t_ours_q4:6.1f} s   ratio "
        f"{t_ours_q4 / (t_convert + t_quant['q4_k_m']):.2f}"
    )
    print(f"q4_k_m + imatrix:    ours {t_ours_iq4:6.1f} s (includes collecting the imatrix)")
    print(
        f"iq4_nl:              llama.cpp quantize {t_quant['iq4_nl']:6.1f} s   ours + imatrix "
        f"{t_ours_nl:6.1f} s"
    )
    print(f"auto + imatrix:      ours {t_ours_auto:6.1f} s (imatrix, sensitivity, export)")
    print(f"identical to llama.cpp's: {same_types}")
    base = reports["llama.cpp q4_k_m"].quality.kld_mean
    for name, rep in reports.items():
        q = rep.quality
        print(
            f"{name:<22} size {rep.size_bytes / 1e6:6.1f} MB  KLD mean {q.kld_mean:.5f} "
            f"(x{q.kld_mean / base:.3f})  p99 {q.kld_p99:.4f}  ppl ratio {q.ppl_ratio:.4f}  "
            f"top-1 {q.top1 * 100:.2f}%"
        )
    print(json.dumps({k: v.quality.to_dict() for k, v in reports.items()}, sort_keys=True))


if __name__ == "__main__":
    main()
