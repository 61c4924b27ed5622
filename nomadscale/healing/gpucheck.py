"""GPU verification after a node comes back: collect ``nvidia-smi`` and kernel-log output on
the node, pass it back through dynamic node metadata (``gpu.check.*``), parse it into a verdict.

Design: the node is still INELIGIBLE while it is checked, so a new batch job could not be
placed there. Instead the ``gpu-check`` task of the ``maintenance-watcher`` system job (system
allocations survive drains with IgnoreSystemJobs and restart with the VM) watches its node's
meta: ``GpuChecker.start`` sets ``gpu.check.request=<check_id>``; the task runs
``CHECK_SCRIPT``, which writes each output base64-encoded plus ``gpu.check.id=<check_id>`` with
``nomad node meta apply``. ``GpuChecker.result`` returns the verdict once ``gpu.check.id``
equals the check id. The parser (``evaluate``) is pure.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nomadscale.core.ports import NodeMetadata

# Xid codes (NVIDIA Xid catalog): hardware/driver faults that make a node unfit to serve.
CRITICAL_XIDS: Mapping[int, str] = {
    48: "uncorrectable double-bit ECC error",
    63: "page retirement / row remap recorded (GPU reset needed)",
    64: "page retirement or row remap failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}
# Often caused by the application (bad kernel, OOB access): warnings, not a node verdict.
APP_XIDS: Mapping[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault (MMU fault)",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
}
QUERY_GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "ecc.errors.corrected.volatile.total",
    "ecc.errors.uncorrected.volatile.total",
    "ecc.errors.uncorrected.aggregate.total",
)
REMAP_FIELDS = (
    "gpu_bus_id",
    "gpu_uuid",
    "remapped_rows.correctable",
    "remapped_rows.uncorrectable",
    "remapped_rows.pending",
    "remapped_rows.failure",
)
CORRECTED_WARN = 1000  # volatile corrected ECC errors since driver load worth a warning
_NA = {"n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]", ""}
_XID = re.compile(r"NVRM: Xid \((?P<bus>[^)]*)\):\s*(?P<code>\d+)\s*,?\s*(?P<rest>.*)$")
_PID = re.compile(r"pid=(?P<pid>'[^']*'|[^,\s]*)")
_SMI_FAILED = re.compile(
    r"NVIDIA-SMI has failed|couldn't communicate with the NVIDIA driver|Unable to determine"
    r"|command not found|No such file",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    ecc_corrected_volatile: int | None
    ecc_uncorrected_volatile: int | None
    ecc_uncorrected_aggregate: int | None


@dataclass(frozen=True, slots=True)
class RemapReading:
    bus_id: str
    uuid: str
    correctable: int | None
    uncorrectable: int | None
    pending: bool
    failure: bool


@dataclass(frozen=True, slots=True)
class XidEvent:
    bus: str
    code: int
    pid: str
    text: str


@dataclass(frozen=True, slots=True)
class GpuVerdict:
    healthy: bool
    gpus: int
    reasons: tuple[str, ...] = ()  # why unhealthy
    warnings: tuple[str, ...] = ()

    def explain(self) -> str:
        head = f"GPU check {'healthy' if self.healthy else 'UNHEALTHY'}: {self.gpus} GPU(s)"
        parts = [head]
        if self.reasons:
            parts.append("reasons: " + "; ".join(self.reasons))
        if self.warnings:
            parts.append("warnings: " + "; ".join(self.warnings))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "gpus": self.gpus,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
        }


class GpuOutputError(ValueError):
    """nvidia-smi output that cannot be read (the check itself failed)."""


# --- parsing --------------------------------------------------------------------------------


def _count(raw: str) -> int | None:
    v = raw.strip()
    if v.lower() in _NA:
        return None
    try:
        return int(v)
    except ValueError:
        raise GpuOutputError(f"not a count: {v!r}") from None


def _flag(raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("yes", "true", "1"):
        return True
    if v in ("no", "false", "0") or v in _NA:
        return False
    raise GpuOutputError(f"not a yes/no flag: {raw.strip()!r}")


def _rows(text: str, header_start: str) -> list[list[str]]:
    if _SMI_FAILED.search(text):
        raise GpuOutputError(text.strip().splitlines()[0][:200])
    rows = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not row or not "".join(row).strip():
            continue
        if row[0].strip().lower().startswith(header_start):  # a csv header line
            continue
        if len(row) == 1 and "no devices were found" in row[0].lower():
            return []
        rows.append([c.strip() for c in row])
    return rows


def parse_query_gpu(text: str) -> list[GpuReading]:
    """Output of ``nvidia-smi --query-gpu=<QUERY_GPU_FIELDS> --format=csv,noheader``."""
    out = []
    for row in _rows(text, "index"):
        if len(row) != len(QUERY_GPU_FIELDS):
            raise GpuOutputError(f"expected {len(QUERY_GPU_FIELDS)} fields, got {len(row)}")
        try:
            index = int(row[0])
        except ValueError:
            raise GpuOutputError(f"not a GPU index: {row[0]!r}") from None
        out.append(
            GpuReading(index, row[1], row[2], _count(row[3]), _count(row[4]), _count(row[5]))
        )
    return out


def parse_remapped_rows(text: str) -> list[RemapReading]:
    """Output of ``nvidia-smi --query-remapped-rows=<REMAP_FIELDS> --format=csv`` (header ok).
    GPUs without row remapping (pre-Ampere) answer N/A / [Not Supported]: no readings."""
    out = []
    for row in _rows(text, "gpu_bus_id"):
        if len(row) != len(REMAP_FIELDS):
            raise GpuOutputError(f"expected {len(REMAP_FIELDS)} fields, got {len(row)}")
        out.append(
            RemapReading(
                row[0], row[1], _count(row[2]), _count(row[3]), _flag(row[4]), _flag(row[5])
            )
        )
    return out


def parse_xid(text: str) -> list[XidEvent]:
    """``journalctl -k | grep Xid`` / ``dmesg -T | grep 'NVRM: Xid'`` lines."""
    out = []
    for line in text.splitlines():
        m = _XID.search(line)
        if not m:
            continue
        rest = m.group("rest").strip()
        pm = _PID.search(rest)
        pid = pm.group("pid").strip("'") if pm else ""
        msg = re.sub(r"^(pid=('[^']*'|[^,]*),\s*)?(name=[^,]*,\s*)?", "", rest).strip()
        out.append(XidEvent(m.group("bus").strip(), int(m.group("code")), pid, msg))
    return out


def evaluate(
    *,
    query_gpu: str,
    remapped_rows: str = "",
    xid: str = "",
    expected_gpus: int | None = None,
) -> GpuVerdict:
    """Turn raw outputs into a verdict. Unreadable nvidia-smi output is itself unhealthy."""
    reasons: list[str] = []
    warnings: list[str] = []
    try:
        gpus = parse_query_gpu(query_gpu)
    except GpuOutputError as exc:
        return GpuVerdict(False, 0, (f"nvidia-smi query failed: {exc}",))
    if expected_gpus is not None and len(gpus) != expected_gpus:
        reasons.append(f"{len(gpus)} GPU(s) visible, expected {expected_gpus}")
    elif not gpus:
        reasons.append("no GPU visible")
    for g in gpus:
        if g.ecc_uncorrected_volatile:
            reasons.append(
                f"GPU {g.index}: {g.ecc_uncorrected_volatile} uncorrectable ECC error(s) "
                "since driver load"
            )
        if g.ecc_uncorrected_aggregate:
            warnings.append(
                f"GPU {g.index}: {g.ecc_uncorrected_aggregate} uncorrectable ECC error(s) lifetime"
            )
        if g.ecc_corrected_volatile is not None and g.ecc_corrected_volatile >= CORRECTED_WARN:
            warnings.append(f"GPU {g.index}: {g.ecc_corrected_volatile} corrected ECC errors")
        if g.ecc_uncorrected_volatile is None and g.ecc_corrected_volatile is None:
            warnings.append(f"GPU {g.index}: ECC counters not available")
    if remapped_rows.strip():
        try:
            remaps = parse_remapped_rows(remapped_rows)
        except GpuOutputError as exc:
            remaps = []
            warnings.append(f"row remap query unreadable: {exc}")
        for r in remaps:
            if r.failure:
                reasons.append(f"GPU {r.bus_id}: row remapping failed (hardware service needed)")
            if r.pending:
                reasons.append(f"GPU {r.bus_id}: row remap pending (GPU reset needed)")
            if r.uncorrectable:
                warnings.append(
                    f"GPU {r.bus_id}: {r.uncorrectable} row(s) remapped (uncorrectable)"
                )
    seen: set[tuple[int, str]] = set()
    for ev in parse_xid(xid):
        if (ev.code, ev.bus) in seen:
            continue
        seen.add((ev.code, ev.bus))
        if ev.code in CRITICAL_XIDS:
            reasons.append(f"Xid {ev.code} on {ev.bus}: {CRITICAL_XIDS[ev.code]}")
        elif ev.code in APP_XIDS:
            warnings.append(f"Xid {ev.code} on {ev.bus}: {APP_XIDS[ev.code]} (often app-caused)")
        else:
            warnings.append(f"Xid {ev.code} on {ev.bus}: {ev.text[:80]}")
    return GpuVerdict(not reasons, len(gpus), tuple(reasons), tuple(warnings))


# --- the check job ----------------------------------------------------------------------------

META_PREFIX = "gpu.check."
CHECK_SCRIPT = r"""set -u
q=$(nvidia-smi --query-gpu=QFIELDS --format=csv,noheader 2>&1)
r=$(nvidia-smi --query-remapped-rows=RFIELDS --format=csv 2>&1)
x=$( (journalctl -k -b --no-pager 2>/dev/null || dmesg -T 2>/dev/null) | grep 'NVRM: Xid' | tail -n 50)
b64() { printf '%s' "$1" | base64 -w0; }
exec nomad node meta apply -node-id "$NODE_ID" "gpu.check.id=$CHECK_ID" \
  "gpu.check.encoding=base64" "gpu.check.query_gpu=$(b64 "$q")" \
  "gpu.check.remapped_rows=$(b64 "$r")" "gpu.check.xid=$(b64 "$x")"
""".replace("QFIELDS", ",".join(QUERY_GPU_FIELDS)).replace("RFIELDS", ",".join(REMAP_FIELDS))


class CheckNomad(Protocol):
    def node_metadata(self, node_id: str) -> NodeMetadata: ...

    def set_node_metadata(self, node_id: str, meta: Mapping[str, str | None]) -> NodeMetadata: ...


def _decode(meta: Mapping[str, str | None], key: str, b64: bool) -> str:
    raw = meta.get(META_PREFIX + key) or ""
    if not b64:
        return raw
    try:
        return base64.b64decode(raw, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return raw


def verdict_from_meta(
    meta: Mapping[str, str | None], check_id: str, *, expected_gpus: int | None
) -> GpuVerdict | None:
    """The verdict for ``check_id`` from node meta, or None while it has not reported."""
    if meta.get(META_PREFIX + "id") != check_id:
        return None
    b64 = meta.get(META_PREFIX + "encoding") == "base64"
    return evaluate(
        query_gpu=_decode(meta, "query_gpu", b64),
        remapped_rows=_decode(meta, "remapped_rows", b64),
        xid=_decode(meta, "xid", b64),
        expected_gpus=expected_gpus,
    )


def encode_meta(check_id: str, *, query_gpu: str, remapped_rows: str, xid: str) -> dict[str, str]:
    """What ``CHECK_SCRIPT`` writes (used by tests and the twin to play the task's part)."""

    def b(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    return {
        META_PREFIX + "id": check_id,
        META_PREFIX + "encoding": "base64",
        META_PREFIX + "query_gpu": b(query_gpu),
        META_PREFIX + "remapped_rows": b(remapped_rows),
        META_PREFIX + "xid": b(xid),
    }


class GpuChecker:
    def __init__(self, nomad: CheckNomad) -> None:
        self._nomad = nomad

    def start(self, node_id: str, check_id: str) -> None:
        """Ask the node's checker task for a run (it answers with ``gpu.check.id``)."""
        self._nomad.set_node_metadata(node_id, {META_PREFIX + "request": check_id})

    def result(
        self, node_id: str, check_id: str, *, expected_gpus: int | None
    ) -> GpuVerdict | None:
        md = self._nomad.node_metadata(node_id)
        return verdict_from_meta(md.meta, check_id, expected_gpus=expected_gpus)


def expected_gpu_count(meta: Mapping[str, str], default: int | None) -> int | None:
    """``gpu.count`` from the node's static meta when set, else ``default``."""
    raw = meta.get("gpu.count")
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


__all__: Sequence[str] = (
    "APP_XIDS",
    "CRITICAL_XIDS",
    "GpuChecker",
    "GpuVerdict",
    "evaluate",
    "parse_query_gpu",
    "parse_remapped_rows",
    "parse_xid",
    "verdict_from_meta",
)
