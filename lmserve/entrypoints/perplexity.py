"""`lmserve perplexity`: load the model (and the reference), score the text file's windows with
lmserve.quality, print a table and optionally write the figures as JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lmserve.errors import InvalidParameterError
from lmserve.quality import QualityReport, quality_report, text_windows


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidParameterError("text", f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameterError("text", f"cannot read {path} as UTF-8 text ({exc})") from None


def _load(model: str, args, kv_cache_dtype: str = "auto"):
    from lmserve import LLM

    engine = LLM(model, dtype=args.dtype, quantization=args.quantization, device=args.device,
                 threads=args.threads, kv_cache_dtype=kv_cache_dtype).engine
    if args.ctx > engine.max_model_len:
        raise InvalidParameterError("ctx", f"{args.ctx} exceeds {model}'s context limit of "
                                           f"{engine.max_model_len} tokens")
    return engine


def run_perplexity(args) -> QualityReport:
    text = _read_text(args.text)
    engine = _load(args.model, args, args.kv_cache_dtype)  # the reference keeps its default cache
    windows = text_windows(engine.tokenizer, text, args.ctx, args.max_windows)
    reference = _load(args.reference, args) if args.reference else None
    if reference is not None and reference.model_config.vocab_size != engine.model_config.vocab_size:
        raise InvalidParameterError("reference", f"vocabulary of {reference.model_config.vocab_size} tokens "
                                                 f"differs from the model's {engine.model_config.vocab_size}")
    start = time.perf_counter()
    report = quality_report(engine.score, windows, reference.score if reference is not None else None)
    elapsed = time.perf_counter() - start
    _print_table(args, report, elapsed)
    if args.json:
        figures = {"model": args.model, "reference": args.reference, "text": args.text,
                   "seconds": elapsed, **report.to_dict()}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return report


def _print_table(args, report: QualityReport, elapsed: float) -> None:
    rows = [("windows", f"{report.num_windows} x {report.ctx} tokens, {report.num_scored} scored positions "
                        f"(second half of each window)"),
            ("perplexity", f"{report.perplexity:.4f} +/- {report.perplexity_stderr:.4f}  ({args.model})")]
    if report.mean_kl is not None:
        rows += [("reference perplexity", f"{report.reference_perplexity:.4f}  ({args.reference})"),
                 ("mean KL(ref || model)", f"{report.mean_kl:.6f} nats"),
                 ("top-1 agreement", f"{report.top1_agreement * 100:.2f}%")]
    rows.append(("time", f"{elapsed:.1f} s"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=sys.stdout)
