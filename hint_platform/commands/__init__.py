"""Command groups of the `hint` CLI: each module exposes `register(subparsers)`; every parser it
adds sets `func` (args -> exit code)."""
