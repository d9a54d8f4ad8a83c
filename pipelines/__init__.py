"""The data: corpus readers (C4, Super-Natural Instructions, P3, a synthetic suite), the HINT
and baseline input formats, tokenisation, and Ray Data pipelines that stream them into training.

Imports neither hint_model nor hint_platform, nor torch: batches become tensors in
`pipelines.collate` (`from pipelines.collate import collate`), which only the processes that
train or predict load; Ray Data's processes of a stream need none of it.
"""

from pipelines import c4, formats, p3, p3_templates, sni, synthetic
from pipelines.bad_records import BadRecordError, BadRecords
from pipelines.budget import TokenBudget
from pipelines.dataset import build_dataset, iter_records
from pipelines.prepare import prepare, stats_table
from pipelines.spec import SourceSpec, SpecError
from pipelines.synthetic import write_suite
from pipelines.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BadRecordError", "BadRecords", "SourceSpec", "SpecError", "TokenBudget", "Tokenizer",
    "build_dataset", "iter_records", "load_tokenizer", "prepare",
    "stats_table", "train_tokenizer", "write_suite",
    "c4", "formats", "p3", "p3_templates", "sni", "synthetic",
]
