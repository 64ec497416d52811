"""The `lmserve` command line: generate, chat, info, serve, batch and bench.

Every user-caused failure (bad file, bad value) is an `LmserveError`; it is printed as one
`error: ...` line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

from lmserve.config import DEFAULT_MAX_WAITING, DEFAULT_REQUEST_TIMEOUT, SPECULATIVE_METHODS
from lmserve.errors import InvalidParameterError, LmserveError
from lmserve.loadtest.serve import add_parser as add_bench_parser
from lmserve.loadtest.serve import cmd_bench


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="GGUF file, Hugging Face directory or short name (default: embedded smollm2-135m)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (float16 on GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the compute dtype), bfloat16 or float16 (16-bit K/V), int8 or fp8 (quantized)")
    p.add_argument("--quantization", default="auto",
                   help="auto (keep a GGUF file's quantized weights packed), none (dequantize to --dtype), "
                        "int8 or int4 (weight-only quantization at load)")
    p.add_argument("--deterministic", action="store_true",
                   help="run packed weights the same way at every batch size, so a request's tokens do not "
                        "depend on what it is batched with (slower decode)")
    p.add_argument("--prefill-precision", default="fp32", choices=("fp32", "bf16"),
                   help="GEMMs of prefill on packed CPU weights: fp32 (exact) or bf16 (faster on AVX512-BF16 CPUs)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step through the PyTorch modules instead of the fused native decoder")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show start-up logs (also accepted before the command)")
    p.add_argument("--speculative-method", default=None, choices=SPECULATIVE_METHODS,
                   help="speculative decoding: ngram (prompt lookup) or draft (a smaller model, "
                        "--speculative-model) proposes tokens the model verifies in one step")
    p.add_argument("--speculative-model", default=None,
                   help="the draft model for --speculative-method draft (same vocabulary as the model)")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="tokens proposed per step with --speculative-method (default 4)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N processes (torch.distributed, gloo on CPU); default 1")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters on the model")
    p.add_argument("--max-loras", type=int, default=4, help="different LoRA adapters in one step (default 4)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest LoRA rank accepted (default 64)")
    p.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept loaded (default --max-loras)")
    p.add_argument("--lora-dtype", default="auto",
                   help="what adapter factors are stored as: auto (bfloat16 on a quantized base, else the "
                        "compute dtype), float32 or bfloat16")


def _add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="run with this PEFT LoRA adapter directory on the model (implies --enable-lora)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None, metavar="FILE_OR_JSON",
                            help="constrain the output to this JSON schema (a file, or the schema's JSON text)")
    constraint.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    constraint.add_argument("--regex", default=None, help="constrain the output to match this regular expression")
    constraint.add_argument("--choice", action="append", default=None,
                            help="constrain the output to one of these strings (repeatable)")
    constraint.add_argument("--grammar", default=None, metavar="FILE",
                            help="constrain the output to a Lark or GBNF grammar in this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description="LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="show start-up logs")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt, streamed")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    _add_model_args(gen)
    _add_sampling_args(gen)
    _add_lora_arg(gen)

    chat = sub.add_parser("chat", help="interactive multi-turn chat")
    chat.add_argument("--system", default=None)
    _add_model_args(chat)
    _add_sampling_args(chat)
    _add_lora_arg(chat)

    info = sub.add_parser("info", help="describe a model without loading its weights")
    info.add_argument("model", nargs="?", default=None)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, local only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but GET /health")
    serve.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    serve.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    serve.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                       help="queued requests beyond which new ones get 429")
    serve.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                       help="seconds after which a request is aborted")
    serve.add_argument("--max-body-size", default=None,
                       help="largest request body, e.g. 8MiB (default 4MiB); larger ones get 413")
    serve.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=DIR",
                       help="PEFT LoRA adapters served as models NAME (implies --enable-lora)")

    batch = sub.add_parser("batch", help="run a JSONL file of prompts; resumes an interrupted job")
    batch.add_argument("input", help="JSONL: {\"prompt\" | \"messages\", sampling fields, \"id\"} per line")
    batch.add_argument("output", help="JSONL results, one line per input line")
    batch.add_argument("--chunk-size", type=int, default=64, help="lines run (and written) together")
    _add_model_args(batch)

    ppl = sub.add_parser(
        "perplexity", help="perplexity over a text file (llama.cpp's windows), optionally KL against a reference",
        description="Perplexity over FILE in non-overlapping windows of --ctx tokens, scored as llama.cpp's "
                    "perplexity tool scores them: the text is tokenized with the model's special tokens, each "
                    "window starts with BOS where the model adds one, and only the second half of each window "
                    "is scored (positions ctx/2 .. ctx-2 predicting the next token), so the figures compare "
                    "with llama-perplexity's on the same text and --ctx. --reference adds the mean KL divergence "
                    "KL(reference || model) over the scored positions, the top-1 agreement and the reference's "
                    "own perplexity.")
    ppl.add_argument("model", help="GGUF file, Hugging Face directory or short name")
    ppl.add_argument("--text", required=True, help="UTF-8 text file to score")
    ppl.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    ppl.add_argument("--reference", default=None, help="second model run on the same windows")
    ppl.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    ppl.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    ppl.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (float16 on GPU)")
    ppl.add_argument("--kv-cache-dtype", default="auto",
                     help="the model's KV cache (bfloat16, float16, int8, fp8); the reference keeps its default, "
                          "so --reference with the same model gives the cache's KL")
    ppl.add_argument("--quantization", default="auto", help="auto, none, int8 or int4 (see LLM options)")
    ppl.add_argument("--device", default="cpu")
    ppl.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")

    quant = sub.add_parser(
        "quantize", help="write a GGUF file with the weight matrices quantized (q4_k, q8_0, q4_0, q4_1, q5_0)",
        description="Read IN (a GGUF file, or a Hugging Face directory with a byte-level BPE tokenizer) and write "
                    "OUT with every weight matrix in --type and 1-D tensors (norms, biases) in F32; rows that do "
                    "not divide into the type's blocks fall back as in llama.cpp (Q4_K to Q5_0), else to F16 "
                    "(logged with -v).")
    quant.add_argument("input", help="GGUF file or Hugging Face model directory")
    quant.add_argument("output", help="GGUF file to write")
    quant.add_argument("--type", required=True,
                       help="q4_k, q8_0, q4_0, q4_1, q5_0, or f16 / f32 (a dequantized copy, e.g. a reference)")

    add_bench_parser(sub)
    return parser


def _llm(args):
    # Importing PyTorch and loading a model make about a million objects that live as long as the
    # process. In a process of the command line's own, the garbage collector's full passes over
    # them (~0.1 s each, freeing nothing) are skipped while loading, and later ones leave them out.
    pause_collector = getattr(args, "standalone", False) and gc.isenabled()
    if pause_collector:
        gc.disable()
    try:
        from lmserve import LLM
        return LLM(args.model, dtype=args.dtype, device=args.device, threads=args.threads,
                   max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                   kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                   deterministic=args.deterministic, enforce_eager=args.enforce_eager,
                   prefill_precision=args.prefill_precision,
                   speculative=_speculative(args), tensor_parallel_size=args.tensor_parallel_size,
                   max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                   max_cpu_loras=args.max_cpu_loras, lora_dtype=args.lora_dtype, enable_lora=args.enable_lora or bool(
                       getattr(args, "lora_modules", None) or getattr(args, "lora", None)))
    finally:
        if pause_collector:
            gc.freeze()
            gc.enable()


def _speculative(args) -> dict | None:
    if args.speculative_method is None:
        for flag in ("num_speculative_tokens", "speculative_model"):
            if getattr(args, flag) is not None:
                raise InvalidParameterError(flag.replace("_", "-"), "needs --speculative-method")
        return None
    options = {"method": args.speculative_method}
    if args.speculative_model is not None:
        options["model"] = args.speculative_model
    if args.num_speculative_tokens is not None:
        options["num_speculative_tokens"] = args.num_speculative_tokens
    return options


def _params(args):
    from lmserve import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop, structured=_structured(args))


def _structured(args):
    """The output constraint the flags ask for, or None."""
    from lmserve import StructuredOutputs
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            text = _read_text("json-schema", text)
        return StructuredOutputs(json=text)
    if args.json_object:
        return StructuredOutputs(json_object=True)
    if args.regex is not None:
        return StructuredOutputs(regex=args.regex)
    if args.choice is not None:
        return StructuredOutputs(choice=args.choice)
    if args.grammar is not None:
        return StructuredOutputs(grammar=_read_text("grammar", args.grammar))
    return None


def _read_text(flag: str, path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(flag, f"cannot read {path!r}: {exc.strerror or exc}") from None


def _lora(args):
    """The adapter `--lora` names, or None."""
    from lmserve import LoRARequest
    return LoRARequest(Path(args.lora).name or "lora", 1, args.lora) if args.lora else None


def _lora_modules(args) -> dict[str, str]:
    modules = {}
    for item in args.lora_modules or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InvalidParameterError("lora-modules", f"expected NAME=DIR, got {item!r}")
        modules[name] = path
    return modules


def _stream(llm, prompt, params, lora=None) -> tuple[str, object]:
    """Print the completion as it is produced; return its text and final output."""
    out = sys.stdout
    text, final = "", None
    for output in llm.stream(prompt, params, lora_request=lora):
        delta = output.outputs[0].delta_text
        text += delta
        out.write(delta)
        out.flush()
        final = output
    out.write("\n")
    return text, final


def _print_stats(final, llm) -> None:
    m = final.metrics
    tpot = m.time_per_output_token
    rate = f"{1 / tpot:.1f} tokens/s" if tpot else "n/a tokens/s"
    spec = llm.engine.stats().spec
    speculation = (f"; speculation: {spec.acceptance_rate:.0%} of {spec.num_proposed} proposals accepted, "
                   f"{spec.mean_accepted:.2f} per verification, proposer {spec.proposer_seconds * 1000:.0f} ms"
                   if spec is not None else "")
    print(f"[{m.num_prompt_tokens} prompt tokens, {m.num_output_tokens} generated; "
          f"TTFT {m.time_to_first_token * 1000:.0f} ms; decode {rate}; "
          f"finish: {final.outputs[0].finish_reason}{speculation}]", file=sys.stderr)


def cmd_generate(args) -> None:
    params = _params(args)
    llm = _llm(args)
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = llm.apply_chat_template(messages + [{"role": "user", "content": prompt}])
    _, final = _stream(llm, prompt, params, _lora(args))
    _print_stats(final, llm)


def cmd_chat(args) -> None:
    params = _params(args)
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    lora = _lora(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply, _ = _stream(llm, llm.apply_chat_template(messages), params, lora)
        messages.append({"role": "assistant", "content": reply})


def cmd_info(args) -> None:
    from lmserve.loader import open_checkpoint
    from lmserve.models import registry

    ckpt = open_checkpoint(args.model)
    cfg = ckpt.config
    rows = [
        ("path", ckpt.path), ("format", ckpt.format), ("architecture", cfg.architecture),
        ("parameters", f"{ckpt.num_params:,}"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in sorted(ckpt.tensor_types.items()))),
        ("layers", cfg.num_layers), ("hidden size", cfg.hidden_size),
        ("heads (q / kv)", f"{cfg.num_heads} / {cfg.num_kv_heads}, head_dim {cfg.head_dim}"),
        ("vocab size", cfg.vocab_size), ("context length", cfg.max_position_embeddings),
        ("sliding window", cfg.sliding_window or "none"),
        ("rope", f"theta {cfg.rope_theta:g}, scaling {cfg.rope_scaling or 'none'}"),
        ("KV cache bytes/token", f"{cfg.kv_bytes_per_token(4):,} (float32), {cfg.kv_bytes_per_token(2):,} (bfloat16)"),
        ("chat template", "yes" if ckpt.tokenizer is not None and ckpt.tokenizer.chat_template else "no"),
        ("supported architectures", ", ".join(f.architecture for f in registry.families())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_serve(args) -> None:
    from lmserve.default_model import DEFAULT_MODEL
    from lmserve.server import build_app, serve

    modules = _lora_modules(args)
    llm = _llm(args)
    app = build_app(llm.engine, args.served_model_name or args.model or DEFAULT_MODEL, api_key=args.api_key,
                    max_waiting=args.max_waiting, request_timeout=args.request_timeout,
                    metrics_public=args.metrics_public, max_body_size=args.max_body_size, lora_modules=modules)
    serve(app, host=args.host, port=args.port)


def cmd_batch(args) -> None:
    from lmserve.entrypoints.batch import run_batch

    ran = run_batch(_llm(args), args.input, args.output, chunk_size=args.chunk_size)
    print(f"{ran} line(s) run; results in {args.output}", file=sys.stderr)


def cmd_perplexity(args) -> None:
    from lmserve.entrypoints.perplexity import run_perplexity

    run_perplexity(args)


def cmd_quantize(args) -> None:
    from lmserve.quant.gguf_writer import quantize_model

    counts = quantize_model(args.input, args.output, args.type)
    print(f"wrote {args.output}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) + " tensors",
          file=sys.stderr)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "serve": cmd_serve,
            "batch": cmd_batch, "bench": cmd_bench, "perplexity": cmd_perplexity, "quantize": cmd_quantize}


# Commands whose output is only stdout and stderr: run from the command line, their process ends
# as soon as they are done, without the interpreter's teardown, which takes ~0.5 s once PyTorch is
# imported (it frees PyTorch's objects one by one).
_EXIT_AT_ONCE = ("generate", "chat", "info")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.standalone = argv is None  # run as the `lmserve` command, in a process of its own
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        COMMANDS[args.command](args)
        code = 0
    except LmserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    if args.standalone and args.command in _EXIT_AT_ONCE:
        _exit_at_once(code)
    return code


def _exit_at_once(code: int) -> None:
    tensor_parallel = sys.modules.get("lmserve.engine.tensor_parallel")
    if tensor_parallel is not None:  # its workers and shared memory are not left to a teardown that will not run
        tensor_parallel.close_all()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written to it
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
