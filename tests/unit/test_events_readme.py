"""events/README.md documents every sample event in events/, and only those."""

from __future__ import annotations

import re
from pathlib import Path

EVENTS = Path(__file__).resolve().parents[2] / "events"


def test_every_sample_event_is_documented_and_every_documented_one_exists() -> None:
    documented = set(re.findall(r"^\| `([a-z0-9_]+\.json)` \|", (EVENTS / "README.md").read_text(), re.MULTILINE))
    present = {p.name for p in EVENTS.glob("*.json")}
    assert documented == present, {
        "undocumented": sorted(present - documented),
        "missing": sorted(documented - present),
    }
