"""Start-up time and peak memory of lmserve on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF).

Every figure comes from a fresh process (the file in the page cache, the native kernels already
built), run --repeat times; the best and the median are printed:

- `lmserve --help` and `lmserve info`: the command line without PyTorch;
- `import torch`: the floor every start pays;
- `from lmserve import LLM` and then `LLM()` (GGUF read, tokenizer, weights packed, KV cache),
  timed inside the process, with its peak RSS;
- `lmserve generate "Hello" --max-tokens 4`: wall time to the first generated text on stdout and
  to exit, measured from outside the process, and its peak RSS (from wait4).

    .venv/bin/python benchmarks/bench_startup.py [--repeat 5] [--threads N] [--kv-cache-memory 1GiB] \
        [--llama-bin ~/.cache/lmserve-llamacpp/build/bin]   # also llama.cpp's llama-completion
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_IMPORT_TORCH = """
import json, resource, time
start = time.perf_counter()
import torch
print(json.dumps({"import": time.perf_counter() - start,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_LLM = """
import json, resource, sys, time
start = time.perf_counter()
from lmserve import LLM
imported = time.perf_counter()
llm = LLM(kv_cache_memory=sys.argv[1], **({"threads": int(sys.argv[2])} if sys.argv[2] else {}))
print(json.dumps({"import": imported - start, "llm": time.perf_counter() - imported,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _python_run(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cli_generate(threads: str, kv_cache_memory: str) -> dict:
    """Wall seconds to the first byte of output and to exit, and peak RSS (MiB), of one generate."""
    command = [str(Path(sys.executable).with_name("lmserve")), "generate", "Hello", "--max-tokens", "4",
               "--kv-cache-memory", kv_cache_memory]
    if threads:
        command += ["--threads", threads]
    return _timed_generate(command)


def _llama_generate(bin_dir: str, model: str, threads: str, context: int) -> dict:
    """The same for llama.cpp's llama-completion: the same prompt, 4 tokens, the model's context."""
    return _timed_generate([str(Path(bin_dir) / "llama-completion"), "-m", model, "-p", "Hello", "-n", "4",
                            "-no-cnv", "--no-display-prompt", "-c", str(context), "-t", threads or "2"])


def _timed_generate(command: list[str]) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.read(1)
    first_output = time.perf_counter() - start
    rest = process.stdout.read()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode or not first:
        raise SystemExit(f"{command[0]} failed ({process.returncode}): {stderr.decode()[-2000:]}")
    del rest
    return {"first_output": first_output, "wall": wall, "rss": usage.ru_maxrss / 1024}


def _cli_wall(*argv: str) -> float:
    """Wall seconds of `lmserve argv...`."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("lmserve")), *argv], capture_output=True, check=True)
    return time.perf_counter() - start


def _summary(label: str, values: list[float], unit: str) -> str:
    return f"  {label:44s} best {min(values):7.3f} {unit}   median {statistics.median(values):7.3f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", default="", help="--threads for LLM() and the CLI (default: lmserve's)")
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--llama-bin", default=None, help="llama.cpp bin directory with llama-completion: "
                                                          "its cold generate side by side")
    args = parser.parse_args()

    from lmserve.quant.native import cpu_name, describe_cpu, load

    load()  # build the native kernels now if this is their first use, so no run below pays for it
    from lmserve.default_model import DEFAULT_MODEL, resolve_embedded
    from lmserve.loader.gguf_layout import read_gguf

    model = resolve_embedded(DEFAULT_MODEL)
    metadata = read_gguf(Path(model)).metadata
    context = metadata[f"{metadata['general.architecture']}.context_length"]
    runs: dict[str, list[dict]] = {"torch": [], "llm": [], "cli": [], "help": [], "info": [], "llama": []}
    for _ in range(args.repeat):  # interleaved, so a slow spell of a shared machine hits all alike
        runs["help"].append({"wall": _cli_wall("--help")})
        runs["info"].append({"wall": _cli_wall("info")})
        runs["torch"].append(_python_run(_IMPORT_TORCH))
        runs["llm"].append(_python_run(_LLM, args.kv_cache_memory, args.threads))
        runs["cli"].append(_cli_generate(args.threads, args.kv_cache_memory))
        if args.llama_bin:
            runs["llama"].append(_llama_generate(args.llama_bin, model, args.threads, context))

    print(f"CPU: {cpu_name()} ({describe_cpu()}); {os.cpu_count()} CPUs online, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; threads: {args.threads or 'default'}; "
          f"KV cache {args.kv_cache_memory}; {args.repeat} runs each")

    def column(kind, key):
        return [run[key] for run in runs[kind]]

    print(_summary("lmserve --help (wall)", column("help", "wall"), "s"))
    print(_summary("lmserve info (wall)", column("info", "wall"), "s"))
    print(_summary("import torch", column("torch", "import"), "s"))
    print(_summary("import torch: peak RSS", column("torch", "rss"), "MiB"))
    print(_summary("from lmserve import LLM", column("llm", "import"), "s"))
    print(_summary("LLM() after imports", column("llm", "llm"), "s"))
    print(_summary("import + LLM(): peak RSS", column("llm", "rss"), "MiB"))
    print(_summary("lmserve generate: first output (wall)", column("cli", "first_output"), "s"))
    print(_summary("lmserve generate --max-tokens 4: exit (wall)", column("cli", "wall"), "s"))
    print(_summary("lmserve generate: peak RSS", column("cli", "rss"), "MiB"))
    if runs["llama"]:
        print(f"llama.cpp's llama-completion, the same prompt and 4 tokens, -c {context} (the model's context):")
        print(_summary("llama-completion: first output (wall)", column("llama", "first_output"), "s"))
        print(_summary("llama-completion: exit (wall)", column("llama", "wall"), "s"))
        print(_summary("llama-completion: peak RSS", column("llama", "rss"), "MiB"))
        for key, label in (("first_output", "first output"), ("wall", "exit"), ("rss", "peak RSS")):
            ratio = statistics.median(column("cli", key)) / statistics.median(column("llama", key))
            print(f"  lmserve / llama.cpp, {label} (medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
