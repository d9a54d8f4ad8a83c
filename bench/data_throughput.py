"""Is data ever the bottleneck? The Ray Data pipeline's rate beside a tiny trainer's.

1. The pipeline: build_dataset over Super-Natural Instructions ('Def + 2 Pos', the T5
   tokenizer, the paper's lengths 1024/1024/256) mixed with C4 pretraining segments, read to
   the end through `iter_batches` on a local Ray: tokenised examples/s and tokens/s
   (instruction + input + target tokens). Without ../shared/data it uses the synthetic suite.
2. The trainer: a tiny HINT model (preset tiny) doing forward + backward + AdamW on collated
   batches of the same rows, in this process: examples/s it consumes.

Prints both and, last, `data_to_train_ratio=<x> examples_per_s=<x> tokens_per_s=<x>`
(the pipeline's rates). Goal: ratio >= 5.
Usage: python bench/data_throughput.py [--synthetic]   (--synthetic: the demo's data)
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from hint_model import HintConfig, HintModel
from pipelines import build_dataset, iter_records, load_tokenizer, train_tokenizer, write_suite
from pipelines.collate import collate

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LENS = {"max_input_len": 1024, "max_hyper_len": 1024, "max_target_len": 256}
BATCH = 8


def sources(tmp: str, synthetic: bool) -> tuple[list[dict], str, str]:
    if SHARED.is_dir() and not synthetic:
        return ([{"kind": "sni", "path": str(SHARED / "sni"), "split": "mini", "format": "def_pos"},
                 {"kind": "c4", "path": str(SHARED / "c4" / "c4-en.*.json.gz"), "weight": 0.2}],
                str(SHARED / "tokenizer" / "t5"), "SNI mini (Def + 2 Pos) + C4 sample, T5 tokenizer")
    suite = write_suite(Path(tmp) / "suite")
    train_tokenizer(suite.texts(), Path(tmp) / "tok", vocab_size=1000)
    return [suite.sni_spec("def_pos"), suite.c4_spec(weight=0.2)], str(Path(tmp) / "tok"), "synthetic suite"


def pipeline_rate(specs: list[dict], tok: str) -> tuple[int, int, float]:
    start = time.perf_counter()
    examples = tokens = 0
    for batch in build_dataset(specs, tok, **LENS).iter_batches(batch_size=256, batch_format="pyarrow"):
        examples += batch.num_rows
        for column in ("hyper_input_ids", "input_ids", "labels"):
            tokens += len(batch.column(column).combine_chunks().values)
    return examples, tokens, time.perf_counter() - start


def train_rate(specs: list[dict], tok: str, steps: int = 10) -> tuple[int, float]:
    torch.manual_seed(0)
    rows = list(itertools.islice(iter_records(specs, tok, **LENS), steps * BATCH))
    vocab = load_tokenizer(tok).vocab_size
    model = HintModel(HintConfig.preset("tiny", variant="hint", vocab_size=vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [collate(rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)]
    for batch in batches[:1]:  # warm-up
        model(**batch).loss.backward()
    start = time.perf_counter()
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return len(rows), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="the demo's synthetic suite, not ../shared/data")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        specs, tok, what = sources(tmp, args.synthetic)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        examples, tokens, seconds = pipeline_rate(specs, tok)
        ray.shutdown()
        trained, train_seconds = train_rate(specs, tok)
    data_eps, data_tps = examples / seconds, tokens / seconds
    train_eps = trained / train_seconds
    print(f"data: {what}; {os.cpu_count()} CPUs")
    print(f"pipeline: {examples} examples, {tokens} tokens in {seconds:.1f} s (Ray start-up excluded, "
          f"pipeline start-up included): {data_eps:.0f} examples/s, {data_tps:.0f} tokens/s")
    print(f"trainer (tiny HINT, batch {BATCH}, fwd+bwd+AdamW): {trained} examples in {train_seconds:.1f} s: "
          f"{train_eps:.1f} examples/s")
    print(f"data_to_train_ratio={data_eps / train_eps:.1f} examples_per_s={data_eps:.0f} tokens_per_s={data_tps:.0f}")


if __name__ == "__main__":
    main()
