"""A decoder-only concatenation model with and without its instruction's key/value cache, and
HINT, at one task of SNI "Def + 2 Pos." lengths (the paper's Section 5.1 and Appendix C.2).

Lengths: medians over the real task files in ../shared/data/sni (T5 tokenizer) when present,
else bench/inference.py's fallback lengths: instruction = definition + 2 positive examples,
then the instance input and its output. Models, random weights, the T5 vocabulary:
  - HINT: the T5 size preset (--preset; small on CPU, xl on GPU) with its hypernetwork;
  - the decoder-only concat model: GPT-2's block at the T5's width (heads of 64, d_ff 4 d), as
    many layers as match the T5's parameter count (the underlying model, embeddings included).
For n = 1, 10, 100 inputs of the task: the decoder re-reading the instruction with every input
(Tk-Instruct as a decoder-only model runs it), the decoder with the instruction's keys / values
computed once (`generate_modules`) and every input continuing after them, and HINT (its task
state generated once). Greedy, exactly the output length (EOS never emitted), batches of
--batch-size; time as bench/inference.py measures it (CPU: process time, --threads; GPU: wall
time, synchronised). Task-state memory: the TaskModules each keeps per task, as allocated.

  python bench/decoder_inference.py                           # CPU, fp32, a few minutes
  python bench/decoder_inference.py --preset xl --dtype bf16  # GPU

Last line: kv_cache_speedup_at_100=<x> hint_vs_cached_decoder_at_100=<x> kv_cache_mib=<x> hint_state_mib=<x>
(kv_cache_speedup: uncached / cached decoder time; hint_vs_cached_decoder: cached decoder / HINT
time; the memories: per task, at the run's dtype).
"""

from __future__ import annotations

import torch
from inference import (best_of, run_concat, run_hint, sni_lengths, sync, timing_parser,
                       timing_setup)  # bench/inference.py

from hint_model import HintConfig, HintModel
from hint_model.flops import task_cost


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def decoder_config(t5: HintConfig, layers: int) -> HintConfig:
    """GPT-2's block at the T5's width and vocabulary, `layers` deep, concatenation variant."""
    return HintConfig.preset("gpt2-xl", variant="concat", vocab_size=t5.vocab_size, d_model=t5.d_model,
                             d_kv=64, num_heads=t5.d_model // 64, d_ff=4 * t5.d_model, num_layers=layers,
                             eos_token_id=-1, pad_token_id=0)


def build(preset: str, dtype: torch.dtype, device: torch.device) -> tuple[HintModel, HintModel]:
    """HINT at `preset` and the decoder-only model whose depth best matches its T5's
    parameters (on the meta device first: no weights to count)."""
    t5 = HintConfig.preset(preset, variant="hint", eos_token_id=-1)
    with torch.device("meta"):
        target = parameters(HintModel(t5).t5)
        layers = min(range(1, 8 * t5.num_layers + 1),
                     key=lambda n: abs(parameters(HintModel(decoder_config(t5, n))) - target))
    torch.manual_seed(0)
    with device:
        hint, decoder = HintModel(t5), HintModel(decoder_config(t5, layers))
    return hint.to(dtype).eval(), decoder.to(dtype).eval()


@torch.no_grad()
def task_state_mib(model: HintModel, t: int, device: torch.device) -> float:
    """MiB of what the model keeps for one task of t instruction tokens, as allocated."""
    ids = torch.randint(2, model.config.vocab_size, (1, t), device=device)
    return model.generate_modules(ids).nbytes / 2**20


def main() -> None:
    args = timing_parser(__doc__).parse_args()  # --preset: HINT's T5 preset
    device, preset, dtype, batch = timing_setup(args)
    lengths, where = sni_lengths()
    t = round(lengths["definition"] + 2 * lengths["positive_example"])
    i, o = round(lengths["input"]), max(1, round(lengths["output"]))
    hint, decoder = build(preset, dtype, device)
    timing = "wall time" if device.type == "cuda" else f"process CPU time, {args.threads} thread(s)"
    print(f"{str(dtype).removeprefix('torch.')} on {device} ({timing}), batch {batch}; {where}: "
          f"instruction (Def + 2 Pos.) {t}, input {i}, output {o} tokens")
    print(f"HINT {preset}: underlying T5 {parameters(hint.t5) / 1e6:.1f}M parameters (+ hypernetwork "
          f"{(parameters(hint) - parameters(hint.t5)) / 1e6:.1f}M); decoder-only concat: "
          f"{decoder.config.num_layers} GPT-2 layers, {parameters(decoder) / 1e6:.1f}M", flush=True)
    for run, model in ((run_hint, hint), (run_concat, decoder), (run_hint, decoder)):
        run(model, 2, t, i, o, batch, device)  # warm-up: allocator, kernels
    sync(device)

    times = {}
    for n in (1, 10, 100):
        uncached = best_of(lambda: run_concat(decoder, n, t, i, o, batch, device), args.repeats)
        cached = best_of(lambda: run_hint(decoder, n, t, i, o, batch, device), args.repeats)
        hinted = best_of(lambda: run_hint(hint, n, t, i, o, batch, device), args.repeats)
        times[n] = (uncached, cached, hinted)
        cost = task_cost(decoder.config, n, t, i, o)
        print(f"n={n:>3}: decoder {uncached:7.3f} s, with cached instruction {cached:7.3f} s "
              f"(x{uncached / cached:5.2f}; FLOPs x{cost.concat / cost.cached_concat:5.2f}), "
              f"HINT {hinted:7.3f} s", flush=True)
    kv_mib, hint_mib = task_state_mib(decoder, t, device), task_state_mib(hint, t, device)
    print(f"task state per task ({str(dtype).removeprefix('torch.')}): decoder's instruction keys/values "
          f"{kv_mib:.2f} MiB, HINT's modules + fused instruction {hint_mib:.2f} MiB")
    paper = [(name, task_cost(HintConfig.preset(size, variant=variant), 1, t, i, o))
             for name, size, variant in (("GPT-2 XL", "gpt2-xl", "concat"), ("OPT-13B", "opt-13b", "concat"),
                                         ("HINT 3B", "xl", "hint"), ("HINT 11B", "xxl", "hint"))]
    print("at the paper's sizes (bf16, these lengths): " + ", ".join(
        f"{name} {(c.hint_state_bytes if name.startswith('HINT') else c.kv_cache_bytes) / 2**20:.1f} MiB"
        for name, c in paper))
    uncached, cached, hinted = times[100]
    print(f"kv_cache_speedup_at_100={uncached / cached:.2f} hint_vs_cached_decoder_at_100={cached / hinted:.2f} "
          f"kv_cache_mib={kv_mib:.2f} hint_state_mib={hint_mib:.2f}")


if __name__ == "__main__":
    main()
