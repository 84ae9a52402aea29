"""Benchmark runner behind ``lsnet bench NAME``.

A benchmark is a spec file ``jobs/bench/NAME.yaml``::

    name: losses
    description: ...
    runner: pipelines.bench.losses:run     # module:function
    params: {num_objects: [10000, 100000]}  # keyword arguments of the function

The function returns a :class:`BenchResult`; the runner prints it as a table and writes
``results/bench/NAME.json`` together with the machine it ran on. Timings are never asserted in tests.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lsnet.atomic import atomic_write_json
from lsnet.errors import InputError
from pipelines.paths import REPO_ROOT
from pipelines.provenance import machine_info
from pipelines.text import format_table as text_table


@dataclass
class BenchResult:
    """Rows of one benchmark, plus the targets it checks (``{name: {"value", "target", "ok"}}``)."""

    rows: list[dict[str, Any]]
    columns: list[str] | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A benchmark's rows as a table: floats to 4 significant digits, numbers right-aligned."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    return text_table(columns, [[fmt(row.get(c)) for c in columns] for row in rows], right_align=True)


def find_spec(name: str, jobs_dir: Path | None = None) -> Path:
    jobs_dir = jobs_dir or REPO_ROOT / "jobs" / "bench"
    path = jobs_dir / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in jobs_dir.glob("*.yaml"))
        raise InputError(f"no benchmark spec {path} (known: {', '.join(known) or 'none'})")
    return path


def run_benchmark(name: str, overrides: dict[str, Any] | None = None, out_dir: Path | None = None) -> dict:
    """Run benchmark ``name`` from its spec, print the table and write ``results/bench/NAME.json``."""
    spec_path = find_spec(name)
    spec = yaml.safe_load(spec_path.read_text())
    runner = spec.get("runner") if isinstance(spec, dict) else None
    if not isinstance(runner, str) or ":" not in runner:
        raise InputError(f"{spec_path}: needs a mapping with runner: 'module:function', got {runner!r}")
    module_name, _, func_name = runner.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    params = {**(spec.get("params") or {}), **(overrides or {})}
    print(f"== bench {name}: {spec.get('description', '').strip()}")
    start = time.perf_counter()
    result: BenchResult = func(**params)
    elapsed = time.perf_counter() - start
    print(format_table(result.rows, result.columns))
    for check, info in result.checks.items():
        status = "OK" if info.get("ok") else "MISSED"
        print(f"[{status}] {check}: {info.get('value')} (target {info.get('target')})")
    for note in result.notes:
        print(f"note: {note}")
    record = {
        "name": name,
        "spec": str(spec_path.relative_to(REPO_ROOT)),
        "params": params,
        "machine": machine_info(),
        "started_unix": time.time() - elapsed,
        "seconds": elapsed,
        **asdict(result),
    }
    out_path = atomic_write_json((out_dir or REPO_ROOT / "results" / "bench") / f"{name}.json", record, indent=2,
                                 default=str)
    print(f"wrote {out_path}")
    return record
