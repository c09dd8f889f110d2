"""Peak memory of one device's process for one round of a method.

The fleet shares one model between its logical devices, so its own memory says nothing about a
device. This module runs the device's model side exactly as the agent daemon does
(:class:`~edge_agent.local_model.LocalModel`: its own base model, data, adapter, one round of
training and compression) in a fresh interpreter and reports that process's peak RSS. MQTT is
left out: paho's client adds a few MB next to a model of hundreds.

``python -m evaluation.agent_memory SETTINGS.json`` prints ``{"peak_rss_mb": ...}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["measure_peak_rss_mb"]


def measure_peak_rss_mb(settings: dict[str, Any], lora: dict[str, Any], workdir: Path) -> float:
    """Run one round for an agent with ``settings`` (AgentSettings fields) in a child process."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "agent_memory.json"
    spec.write_text(json.dumps({"settings": settings, "lora": lora}, default=str))
    out = subprocess.run(
        [sys.executable, "-m", "evaluation.agent_memory", str(spec)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _main(path: str) -> None:
    from edge_agent.device_state import DeviceState
    from edge_agent.local_model import LocalModel
    from edge_agent.settings import AgentSettings
    from workload.models import LoraSpec

    spec = json.loads(Path(path).read_text())
    settings = AgentSettings.model_validate(spec["settings"])
    lora = LoraSpec(**{**spec["lora"], "target_modules": tuple(spec["lora"]["target_modules"])})
    model = LocalModel(settings, DeviceState(settings.state_dir), seed=0)
    model.load_data()
    model.load_model()
    model.ensure_adapter(lora)
    state = model.adapter_state()  # stands in for the global adapter a device fetches
    c = settings.compression
    # The fleet's budgeted methods use a fixed budget; the others need none.
    budget = c.budget_bytes if c.budget_mode == "fixed" else None
    model.train(state, budget, round_id=1)
    print(json.dumps({"peak_rss_mb": peak_rss_kb() / 1024}))


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM), in kB.

    Not ``getrusage().ru_maxrss``: Linux keeps that across exec, so a child started by a large
    process (the fleet) reports its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


if __name__ == "__main__":
    _main(sys.argv[1])
