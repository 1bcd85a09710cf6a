"""GGUF export and quantization: smolconvert vs llama.cpp's own path, same folder, same run.

    python benchmarks/gguf_vs_llama_cpp.py [--source default] [--windows 8] [--work DIR]

1. Writes the source as a Hugging Face folder (fp32 safetensors) so both tools start from the same
   files.
2. Times llama.cpp's converter (convert_hf_to_gguf.py from the llama-cpp-python 0.3.36 source
   distribution, fetched with pip into the work folder, never committed) to an f32 GGUF, and
   llama.cpp's quantizer (llama_model_quantize) to q4_k_m.
3. Times `smolconvert export` to gguf:f32 and gguf:q4_k_m (plain and with --imatrix) from the
   same folder.
4. Compares per-tensor types and scores every q4_k_m file in llama.cpp with smolconvert's quality
   protocol against the same fp32 reference; prints ratios (ours / theirs).

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
    theirs_q4 = work / "llama-cpp-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    rc, t_quant = timed(
        llama_cpp.llama_model_quantize,
        str(theirs_f32).encode(),
        str(theirs_q4).encode(),
        ctypes.byref(params),
    )
    assert rc == 0, "llama_model_quantize failed"

    ours_f32, t_ours_f32 = timed(smolconvert.export, hf, to="gguf:f32", out=work / "ours-f32")
    ours_q4, t_ours_q4 = timed(smolconvert.export, hf, to="gguf:q4_k_m", out=work / "ours-q4")
    ours_iq4, t_ours_iq4 = timed(
        smolconvert.export, hf, to="gguf:q4_k_m", imatrix=True, out=work / "ours-q4-imatrix"
    )

    their_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(theirs_q4)).tensors}
    same_types = their_types == ours_q4.meta["tensor_types"]

    # Score llama.cpp's q4_k_m with the same protocol: wrap it as an artifact of the hf source.
    their_art = work / "llama-cpp-q4_k_m"
    their_art.mkdir(exist_ok=True)
    (their_art / "model.gguf").write_bytes(theirs_q4.read_bytes())
    from smolconvert.artifact import file_entries, write_json

    write_json(
        their_art / "artifact.json",
        {
            "target": "gguf",
            "scheme": "q4_k_m",
            "source": str(hf),
            "source_sha256": smolconvert.load(hf).sha256,
            "entry_points": {"model": "model.gguf"},
            "files": file_entries(their_art),
        },
    )
    reports = {}
    for name, folder in (
        ("llama.cpp q4_k_m", their_art),
        ("ours q4_k_m", ours_q4.folder),
        ("ours q4_k_m imatrix", ours_iq4.folder),
    ):
        reports[name] = smolconvert.validate(folder, windows=args.windows, latency=False)

    print(f"\nsource: {model.name} ({model.origin})")
    print(
        f"export to f32 GGUF:  llama.cpp converter {t_convert:6.1f} s   ours {t_ours_f32:6.1f} s"
        f"   ratio ours/theirs {t_ours_f32 / t_convert:.2f}"
    )
    print(
        f"q4_k_m from folder:  llama.cpp convert+quantize {t_convert + t_quant:6.1f} s "
        f"(quantize alone {t_quant:.1f} s)   ours {t_ours_q4:6.1f} s   ratio "
        f"{t_ours_q4 / (t_convert + t_quant):.2f}"
    )
    print(f"q4_k_m + imatrix:    ours {t_ours_iq4:6.1f} s (includes collecting the imatrix)")
    print(f"per-tensor types identical to llama.cpp's q4_k_m: {same_types}")
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
