"""In-process demo (what `make serve` runs until the Ray Serve deployment lands):
builds/loads a model and answers a few chat prompts with the engine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="model name or HF folder")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per answer")
    ap.add_argument("prompts", nargs="*", help="user messages (defaults to a few examples)")
    args = ap.parse_args(argv)

    from alignedserve import LLM, SamplingParams
    from alignedserve.engine.model_builder import MODEL_NAMES, ensure_model

    path = Path(args.model) if Path(args.model).exists() else None
    if path is None:
        if args.model not in MODEL_NAMES:
            raise SystemExit(f"unknown model {args.model!r}; names: {', '.join(MODEL_NAMES)}")
        path = ensure_model(args.model)
    llm = LLM(str(path))
    questions = args.prompts or [
        "What is the capital of France?",
        "Write a haiku about batching.",
        "Explain what a KV cache is in one sentence.",
    ]
    tok = llm.tokenizer
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"])
        for q in questions
    ]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    dt = time.perf_counter() - t0
    for q, o in zip(questions, outs, strict=True):
        print(f"\n>>> {q}\n{o.text.strip()}  [{len(o.token_ids)} tokens, {o.finish_reason}]")
    n = sum(len(o.token_ids) for o in outs)
    print(f"\n{n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s). The HTTP server arrives with the "
          "serving issue; this demo runs the engine in-process.")


if __name__ == "__main__":
    main()
