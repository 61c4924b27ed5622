"""Data bundled with nomadscale: a real GPU-inference demand trace (see ATTRIBUTION.md)."""

from __future__ import annotations

from pathlib import Path

BUNDLED_TRACE = "llm_alibaba_servegen_msmall_10min.csv"


def bundled_trace_path() -> Path:
    """Path of the bundled trace (Alibaba ServeGen, m-small language models, 10-min steps)."""
    return Path(__file__).with_name(BUNDLED_TRACE)
