"""A task as a PEFT LoRA adapter, from a served model: `hint adapter` writes one into a
directory, `GET /v1/tasks/{task_id}/adapter` (serving/app.py) sends one as a tar.gz archive.

Both go through a CachedPredictor, so the instruction is formatted and tokenised as every
serving path does it (the SNI 'Def' text; in the causal layout the BOS first and no EOS;
refused beyond max_hyper_len) and the task state is the one its cache holds, when it holds it.
The files are hint_model.peft_export's (PEFT's layout within vLLM's limits), with
hint_provenance.json beside them: the instruction's SHA-256 (of its UTF-8 text as given: for
serving, the task id is its first 16 hex digits), where the model comes from (its export path,
or its registered name, version and run), the base and its revision when known. The base
(adapter_config.json's base_model_name_or_path) is the one the user names, else the one the
model was built from (`base_of`).
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

from hint_model import HintConfig, TaskModules
from hint_model.peft_export import AdapterExportError, adapter_nbytes, check_exportable, instruction_sha256
from hint_platform.serving.predictor import CachedPredictor
from hint_platform.serving.requests import BadRequest

ARCHIVE_TYPE = "application/gzip"  # a .tar.gz: one folder with the adapter's files


class NotExportable(BadRequest):
    """A model whose task states cannot be a PEFT LoRA adapter, or one too large to send; the
    message says why."""

    status = 409  # the server's HTTP status for it (a BadRequest's is 400)


def check(cfg: HintConfig, max_bytes: int | None = None) -> None:
    """Refuse, before anything is generated, a model whose tasks are not a plain LoRA (T5, fusion,
    prefixes, adapters: peft_export.check_exportable), or whose adapter is over `max_bytes`."""
    try:
        check_exportable(cfg)
    except AdapterExportError as e:
        raise NotExportable(str(e)) from None
    size = adapter_nbytes(cfg)
    if max_bytes is not None and size > max_bytes:
        raise NotExportable(f"the adapter would be {size / 2**20:.1f} MiB, more than this server's "
                            f"{max_bytes / 2**20:g} MiB (--max-adapter-mib)")


def base_of(cfg: HintConfig, named: str | None = None) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, its revision) for the adapters of a model of `cfg`: `named` as
    given (hint serve --adapter-base, hint adapter --base; its revision unknown), else the
    Hugging Face checkpoint the model was built from, as its config records it through every
    export and variant since (a hub name from the hub's cache, else the local path it was
    trained from: checkpoint.hf_base); None for a model built from scratch."""
    if named is not None:
        return named, None
    return cfg.base_model_name_or_path, cfg.base_revision


def save(predictor: CachedPredictor, state: TaskModules, instruction: str, directory: str | Path,
         provenance: dict[str, str | None], base: str | None = None) -> Path:
    """Write the task state of `instruction` as a PEFT adapter directory (atomically: see
    peft_export.save_adapter); `provenance` (where the model comes from, the base's revision,
    ...) joins the instruction's SHA-256 in hint_provenance.json."""
    known = {k: v for k, v in provenance.items() if v is not None}
    try:
        return predictor.model.save_peft_adapter(
            state, directory, base_model_name_or_path=base,
            provenance={"instruction_sha256": instruction_sha256(instruction), **known})
    except AdapterExportError as e:
        raise NotExportable(str(e)) from None


def write(predictor: CachedPredictor, instruction: str, directory: str | Path,
          provenance: dict[str, str | None], base: str | None = None) -> Path:
    """The task's adapter in `directory`: its state from the cache, else generated."""
    check(predictor.model.config)
    state, _ = predictor.task_state(predictor.reader.task_key(instruction))
    try:
        return save(predictor, state, instruction, directory, provenance, base)
    finally:
        predictor.cache.release(state)


def archive(predictor: CachedPredictor, state: TaskModules, instruction: str, name: str,
            provenance: dict[str, str | None], base: str | None = None) -> bytes:
    """The task state's adapter as the bytes of a tar.gz holding one folder, `name`."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = save(predictor, state, instruction, Path(tmp) / name, provenance, base)
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz") as tar:
            tar.add(directory, arcname=name, filter=_anonymous)
    return data.getvalue()


def _anonymous(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """No server account names or ids in what a client receives."""
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member
