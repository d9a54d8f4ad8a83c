"""The data: corpus readers (C4, Super-Natural Instructions, P3, a synthetic suite), the HINT
and baseline input formats, tokenisation, and Ray Data pipelines that stream them into training.

Imports neither hint_model nor hint_platform.
"""

from pipelines import c4, formats, p3, p3_templates, sni, synthetic
from pipelines.bad_records import BadRecordError, BadRecords
from pipelines.budget import TokenBudget
from pipelines.collate import collate, step_micro_batches
from pipelines.dataset import build_dataset, iter_records
from pipelines.prepare import prepare, stats_table
from pipelines.spec import SourceSpec, SpecError
from pipelines.synthetic import write_suite
from pipelines.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "BadRecordError", "BadRecords", "SourceSpec", "SpecError", "TokenBudget", "Tokenizer",
    "build_dataset", "collate", "iter_records", "load_tokenizer", "prepare",
    "stats_table", "step_micro_batches", "train_tokenizer", "write_suite",
    "c4", "formats", "p3", "p3_templates", "sni", "synthetic",
]
