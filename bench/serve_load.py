"""Load on `hint serve`: the task-state cache on, then off, same requests.

Starts `hint serve` (its own local Ray) on loopback with a small untrained model, then runs a
bounded number of concurrent clients (--clients) for at most --requests requests or --seconds,
whichever ends first. Requests go to 10 tasks with Zipf-skewed popularity, each task with 100
inputs; a request is one task's instruction and one of its inputs. Why 10 tasks: a served task
answers many inputs (the paper's cost is per task of n inputs; bench/inference.py times n = 100),
while 200 requests over 50 tasks made most misses the first request of a task asked ~4 times.
Instructions are SNI "Def + 2 Pos" texts from ../shared/data/sni with the real T5 tokenizer
when present, else the synthetic suite's. Then the same requests with --cache-mib 0 (every
request regenerates its task's state).

  python bench/serve_load.py                   # CPU: ~5 minutes on 2 busy cores
  python bench/serve_load.py --tasks 50 --inputs 20   # the settings before: most misses cold

Each run also says where the replica's model thread spent the run (GET /v1/stats): generating
task states (what the cache saves), generating outputs, and how many rows a forward took.

Last line: serve_rps=<x> p50_ms=<x> p99_ms=<x> errors=<n> cache_hit_rate=<x> cache_speedup=<x>
(rps and latencies with the cache on; cache_speedup = rps with the cache / rps without.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from hint_model import HintConfig, HintModel
from hint_platform import export
from pipelines import formats, load_tokenizer, train_tokenizer, write_suite

REPO = Path(__file__).resolve().parent.parent
SNI = REPO.parent / "shared" / "data" / "sni" / "tasks"
T5_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizer" / "t5"
TASKS, INPUTS = 10, 100  # the defaults of --tasks and --inputs
MAX_HYPER_LEN = 1024  # the served model's (HintConfig default)


def tasks_and_tokenizer(work: Path, count: int, inputs: int) -> tuple[list[tuple[str, list[str]]], Path, str]:
    """(instruction, inputs) of `count` tasks of up to `inputs` inputs, a tokenizer directory, and
    where they came from."""
    if SNI.is_dir() and T5_TOKENIZER.is_dir():
        files, tokenizer, where = sorted(SNI.glob("*.json")), T5_TOKENIZER, "SNI task files"
    else:
        suite = write_suite(work / "suite", num_train_tasks=count, num_test_tasks=1, instances_per_task=inputs,
                            num_pretrain_docs=5)
        train_tokenizer(suite.texts(), work / "tok", vocab_size=1000)
        files = sorted((Path(suite.root) / "sni" / "tasks").glob("*.json"))
        tokenizer, where = work / "tok", "the synthetic suite"
    tok, tasks = load_tokenizer(tokenizer), []
    for path in files:
        task = json.loads(path.read_text())
        # Def + 2 Pos as one instruction: the served model reads it as its definition.
        instruction = formats.sni_def_pos_hyper(task["Definition"][0], task["Positive Examples"], 2, lambda text: True)
        # The server rightly refuses (400) an instruction over max_hyper_len: leave such tasks out.
        if len(tok.encode(formats.sni_def(instruction, "")[0])) <= MAX_HYPER_LEN:
            tasks.append((instruction, [i["input"] for i in task["Instances"][:inputs]]))
    return tasks[:count], tokenizer, where


def make_export(work: Path, tokenizer: Path, preset: str) -> Path:
    torch.manual_seed(0)
    vocab = load_tokenizer(tokenizer).vocab_size
    model = HintModel(HintConfig.preset(preset, vocab_size=vocab, max_target_len=4, max_hyper_len=MAX_HYPER_LEN))
    return export.write(model, work / "export", tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict | None) -> tuple[int, dict]:
    """POST `body` (None: GET) and the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except OSError:
        return 0, {}


class Server:
    """`hint serve` in its own process group; stopped with SIGINT (it shuts Serve and Ray down).
    A start that fails is tried again (twice): on a busy shared machine Ray's node may not come
    up within its fixed 30 s."""

    def __init__(self, export_dir: Path, cache_mib: float, work: Path, attempts: int = 3):
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.log = open(work / f"serve-cache{cache_mib:g}-{attempt}.log", "wb")
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from hint_platform.cli import main; sys.exit(main())",
                 "serve", str(export_dir), "--port", str(self.port),
                 "--cache-mib", str(cache_mib), "--max-batch-size", "8", "--batch-wait-ms", "10",
                 "--replica-cpus", "1"],
                stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
            if self._healthy(deadline=time.monotonic() + 600):
                return
            self.stop()
            tail = Path(self.log.name).read_text(errors="replace").splitlines()[-15:]
            print(f"hint serve did not start (attempt {attempt} of {attempts}); its log ends:\n" + "\n".join(tail),
                  flush=True)
        raise SystemExit("hint serve did not start")

    def _healthy(self, deadline: float) -> bool:
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/v1/health", timeout=5) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(1)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def load(url: str, requests: list[dict], clients: int, seconds: float) -> dict:
    """Bounded load: `clients` threads take requests in order until none are left or time is up."""
    lock = threading.Lock()
    queue = list(reversed(requests))
    latencies, errors, hits = [], 0, 0
    deadline = time.monotonic() + seconds

    def client():
        nonlocal errors, hits
        while time.monotonic() < deadline:
            with lock:
                if not queue:
                    return
                body = queue.pop()
            start = time.perf_counter()
            status, answer = post(f"{url}/v1/predict", body)
            took = time.perf_counter() - start
            with lock:
                if status == 200 and len(answer.get("outputs", [])) == 1:
                    latencies.append(took)
                    hits += bool(answer.get("cache_hit"))
                else:
                    errors += 1

    before = post(f"{url}/v1/stats", None)[1]
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    after = post(f"{url}/v1/stats", None)[1]
    model = {name: after.get(name, 0) - before.get(name, 0)
             for name in ("state_seconds", "generate_seconds", "batches", "rows")}
    done = len(latencies)
    cuts = statistics.quantiles(latencies, n=100) if done > 1 else [0.0] * 99
    return {"rps": done / elapsed, "p50_ms": 1000 * statistics.median(latencies) if done else 0.0,
            "p99_ms": 1000 * cuts[98], "errors": errors, "done": done,
            "hit_rate": hits / done if done else 0.0, "elapsed": elapsed, **model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", help="model size preset")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=200, help="requests per run (at most)")
    parser.add_argument("--seconds", type=float, default=240, help="time per run (at most)")
    parser.add_argument("--cache-mib", type=float, default=512.0, help="the replica's cache when on")
    parser.add_argument("--tasks", type=int, default=TASKS, help="tasks the requests go to")
    parser.add_argument("--inputs", type=int, default=INPUTS, help="inputs per task (at most)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hint-serve-load-") as tmp:
        work = Path(tmp)
        tasks, tokenizer, where = tasks_and_tokenizer(work, args.tasks, args.inputs)
        export_dir = make_export(work, tokenizer, args.preset)
        rng = random.Random(args.seed)
        weights = [1 / (rank + 1) ** 1.1 for rank in range(len(tasks))]  # Zipf-skewed popularity
        requests = []
        for _ in range(args.requests):
            instruction, inputs = rng.choices(tasks, weights)[0]
            requests.append({"instruction": instruction, "inputs": [rng.choice(inputs)]})
        print(f"{args.preset} model, {len(tasks)} tasks from {where} (Zipf 1.1), up to {args.inputs} inputs each; "
              f"{args.clients} clients, <= {args.requests} requests or {args.seconds:g} s a run", flush=True)
        results = {}
        for label, cache_mib in (("cache on", args.cache_mib), ("cache off", 0.0)):
            server = Server(export_dir, cache_mib, work)
            try:
                post(f"{server.url}/v1/predict", requests[0])  # warm-up: first forward
                results[label] = load(server.url, requests, args.clients, args.seconds)
            finally:
                server.stop()
            r = results[label]
            print(f"{label}: {r['done']} requests, {r['rps']:.2f} req/s, p50 {r['p50_ms']:.0f} ms, "
                  f"p99 {r['p99_ms']:.0f} ms, errors {r['errors']}, cache hits {r['hit_rate']:.2f}; model thread "
                  f"busy {(r['state_seconds'] + r['generate_seconds']) / r['elapsed']:.0%} of {r['elapsed']:.0f} s: "
                  f"task states {r['state_seconds']:.1f} s, outputs {r['generate_seconds']:.1f} s "
                  f"({r['rows']} rows in {r['batches']} forwards); load average {os.getloadavg()[0]:.1f}",
                  flush=True)
    on, off = results["cache on"], results["cache off"]
    print(f"serve_rps={on['rps']:.2f} p50_ms={on['p50_ms']:.0f} p99_ms={on['p99_ms']:.0f} "
          f"errors={on['errors'] + off['errors']} cache_hit_rate={on['hit_rate']:.2f} "
          f"cache_speedup={on['rps'] / off['rps'] if off['rps'] else float('nan'):.2f}")


if __name__ == "__main__":
    main()
