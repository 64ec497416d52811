"""Longer fuzzing of the checkpoint loaders than tests/test_hostile_files.py runs in CI.

Runs that file's hypothesis strategies over the seeds in tests/fuzz_seeds/ (a tiny GGUF file
and a tiny safetensors model directory: truncations, bit flips, header numbers set to edge
values, JSON header entries edited) with many more examples and a fresh random seed each run;
each mutant is opened with `open_checkpoint` and all its tensors are read. Only lmserve's own
errors may come out, and the Python heap may not grow past the test's bound; anything else is a
finding: its mutant is saved under --out, hypothesis shrinks and prints it, and the run exits 1.
Prints how the mutants ended (loaded, or refused with which message) to show how deep they got.

    .venv/bin/python benchmarks/fuzz_loaders.py [--examples 5000] [--out /tmp/lmserve-fuzz-findings]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests`
from tests.test_hostile_files import SEEDS, gguf_mutants, load_everything, safetensors_mutants  # noqa: E402


def fuzz(label: str, strategy, file: Path, checkpoint: Path, examples: int, out: Path) -> bool:
    """Run `examples` mutants through the loader; True if none was a finding."""
    outcomes: Counter = Counter()
    saved = []

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutant=strategy)
    def run(mutant):
        file.write_bytes(mutant)
        try:
            outcomes[load_everything(checkpoint)] += 1
        except BaseException:
            out.mkdir(parents=True, exist_ok=True)
            saved.append(out / f"{label}-{len(saved)}.bin")
            saved[-1].write_bytes(mutant)
            raise

    start = time.perf_counter()
    try:
        run()
        found = False
    except Exception as exc:
        print(f"FINDING in {label}: {type(exc).__name__}: {exc}\n(mutants saved: {', '.join(map(str, saved))})",
              file=sys.stderr)
        found = True
    total = sum(outcomes.values())
    elapsed = time.perf_counter() - start
    print(f"{label}: {total} mutants in {elapsed:.1f} s ({total / elapsed:.0f}/s)")
    for outcome, count in outcomes.most_common(30):
        print(f"  {count:6d}  {outcome[:110]}")
    return not found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="mutants per seed file")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lmserve-fuzz-findings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        shutil.copytree(SEEDS / "tiny_llama_hf", scratch / "hf")
        clean = [fuzz("gguf", gguf_mutants(), scratch / "fuzz.gguf", scratch / "fuzz.gguf", args.examples, args.out),
                 fuzz("safetensors", safetensors_mutants(), scratch / "hf" / "model.safetensors", scratch / "hf",
                      args.examples, args.out)]
    return 0 if all(clean) else 1


if __name__ == "__main__":
    sys.exit(main())
