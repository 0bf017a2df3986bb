"""Schema-driven fuzzing of a running cluster's HTTP API with schemathesis.

Every operation of ``/openapi.json`` gets generated requests (hypothesis, fixed seed, bounded example
count): schema-valid ones and, for operations with a body, schema-violating ones, each sent with every
given header set (e.g. a valid key and none). A finding is a 5xx, or a 4xx whose body is not OpenAI
shaped (``{"error": {message, type, param, code}}``).

    python -m loadtests.fuzz http://127.0.0.1:8000 --key sk-... --examples 200 --out loadtests/results/<run>-fuzz
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation.modes import GenerationMode

ERROR_FIELDS = {"message", "type", "param", "code"}
REQUEST_TIMEOUT_S = 120.0


@dataclass
class FuzzReport:
    seed: int
    examples: int
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_operation: dict[str, dict[str, int]] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)  # 5xx and non-OpenAI-shaped 4xx (first 50)
    duration_s: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.by_status.items() if s.startswith("5"))


def openai_shaped(body: bytes) -> bool:
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == ERROR_FIELDS and isinstance(err["message"], str)


def _run(op, mode, label, headers, base_url, examples, seed, report, statuses, per_op) -> None:
    """``examples`` generated requests of one operation, mode and header set."""

    @hypothesis.seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def one(case) -> None:
        r = case.call(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S)
        status = str(r.status_code)
        statuses[status] += 1
        per_op[status] += 1
        bad = status.startswith("5") or (status.startswith("4") and not openai_shaped(r.content))
        if bad and len(report.findings) < 50:
            report.findings.append(
                {
                    "operation": op.label,
                    "mode": mode.value,
                    "headers": label,
                    "status": r.status_code,
                    "body": r.text[:500],
                    "curl": case.as_curl_command(headers={k: "<redacted>" for k in headers}, base_url=base_url),
                }
            )

    one()


def fuzz(base_url: str, header_sets: dict[str, dict[str, str]], examples: int, seed: int = 0) -> FuzzReport:
    """``examples`` generated requests per operation, generation mode and header set."""
    schema = schemathesis.openapi.from_url(f"{base_url.rstrip('/')}/openapi.json")
    report = FuzzReport(seed=seed, examples=examples)
    statuses: Counter[str] = Counter()
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        per_op: Counter[str] = Counter()
        modes = [GenerationMode.POSITIVE]
        if op.body:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            for label, headers in header_sets.items():
                _run(op, mode, label, headers, base_url, examples, seed, report, statuses, per_op)
        report.by_operation[op.label] = dict(sorted(per_op.items()))
    report.by_status = dict(sorted(statuses.items()))
    report.requests = sum(statuses.values())
    report.duration_s = round(time.monotonic() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("base_url")
    p.add_argument("--key", default=None, help="API key of the header set 'key' (auth on); 'none' always runs")
    p.add_argument("--examples", type=int, default=100, help="per operation, generation mode and header set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="directory for fuzz.json")
    a = p.parse_args(argv)
    header_sets = {"none": {}}
    if a.key:
        header_sets["key"] = {"Authorization": f"Bearer {a.key}"}
    report = fuzz(a.base_url, header_sets, a.examples, a.seed)
    text = json.dumps({**asdict(report), "server_errors": report.server_errors}, indent=1)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "fuzz.json").write_text(text + "\n")
    return 1 if report.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
