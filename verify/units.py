"""The units of work of `python -m verify layer` and `model`, and the one JSON shape of a layer's result.

A unit is a decoder layer (or an MTP block, model only). Whether it ran under `layer --json` or in a
sweep (`model --report-dir`, units/<unit>.json), a verified layer's result is the document of
`layer_result` (verify.report.document.unit_document; layout $defs/unit of
verify/report/model_report.schema.json). `layer --json` writes them under "runs" keyed
`layer<i>/<config>` (schema $defs/layer_report); a sweep writes one file per unit and merges them.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Unit", "mtp_prefixes", "plan_units", "run_fingerprint", "layer_result", "LAYER_REPORT_KIND",
           "layer_report_document"]

LAYER_REPORT_KIND = "nvfp4-verify.layer-report"


@dataclass(frozen=True)
class Unit:
    """One piece of work: a decoder layer (kind "decoder", index = layer) or an MTP block (kind
    "mtp", index = its number; tensors under `prefix`). nbytes: its tensors' stored bytes."""

    name: str
    kind: str
    index: int
    nbytes: int
    prefix: str

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "index": self.index, "nbytes": self.nbytes,
                "prefix": self.prefix}


def mtp_prefixes(ckpt) -> list[tuple[int, str]]:
    """(j, prefix) of every MTP block in the weight_map: V4 `mtp.{j}.`, V3 `model.layers.{n + j}.`
    (the layers past num_hidden_layers)."""
    n = ckpt.config.num_layers
    found: set[int] = set()
    if ckpt.config.schema == "deepseek_v4":
        pattern, offset, fmt = re.compile(r"mtp\.(\d+)\."), 0, "mtp.{}."
    else:
        pattern, offset, fmt = re.compile(r"model\.layers\.(\d+)\."), n, "model.layers.{}."
    for name in ckpt.weight_map:
        m = pattern.match(name)
        if m and int(m.group(1)) >= offset:
            found.add(int(m.group(1)) - offset)
    return [(j, fmt.format(j + offset)) for j in sorted(found)]


def plan_units(ckpt, layers, *, include_mtp: bool) -> list[Unit]:
    """The units of a sweep, in model order, each with its size. Every decoder layer is validated
    against the schema from its headers here (no tensor data read), so a structural defect stops
    the sweep before any work."""
    units = [Unit(f"layer{i}", "decoder", i, ckpt.plan_layer(i).nbytes, f"layers.{i}.") for i in layers]
    if include_mtp:
        for j, prefix in mtp_prefixes(ckpt):
            infos = ckpt.headers_for(ckpt.names_with_prefix(prefix))
            units.append(Unit(f"mtp.{j}", "mtp", j, sum(i.nbytes for i in infos.values()), prefix))
    return units


def run_fingerprint(ckpt, config, backend_name: str | None, device) -> tuple[str, dict]:
    """What makes two runs' unit results interchangeable (a sweep's resume reuses only a matching
    one): the checkpoint's config.json and weight map, the inputs and every option of `config` (a
    verify.config.RunConfig) that changes a result, the backend and the device type."""
    cfg_bytes = (Path(ckpt.directory) / "config.json").read_bytes()
    wm = json.dumps(sorted(ckpt.weight_map.items())).encode()
    inputs = hashlib.sha256(Path(config.inputs).read_bytes()).hexdigest() if config.inputs else None
    fields = {"config_sha256": hashlib.sha256(cfg_bytes).hexdigest(), "weight_map_sha256": hashlib.sha256(wm).hexdigest(),
              "tokens": config.tokens, "seed": config.seed, "inputs_sha256": inputs, "act_scale": config.act_scale,
              "placement": config.placement, "recipe": config.recipe, "fp8_scale_fmt": config.fp8_scale_fmt,
              "backend": backend_name, "device_type": str(device).split(":")[0]}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16], fields


def layer_result(unit: Unit, *, run=None, fingerprint: str, timings_s: dict, device, rank: int = 0,
                 note: str = "") -> dict:
    """The JSON document of one unit's result (a verify.run.LayerRun, or None for a unit only loaded,
    whose `note` says why): the same for `layer --json` and a sweep's units/<unit>.json."""
    from verify.report.document import unit_document  # noqa: PLC0415

    return unit_document(unit=unit.as_dict(), fingerprint=fingerprint, run=run, timings_s=timings_s, rank=rank,
                         host=socket.gethostname(), device=str(device), note=note)


def layer_report_document(results: dict[str, dict], *, environment: dict, checkpoint, tokens: int,
                          backend: str | None, fingerprint: str, accumulator_findings: list[str] = ()) -> dict:
    """`layer --json` (and `model --json`): the run's layer results (layer_result documents) keyed
    `layer<i>/<config>` under "runs" (schema $defs/layer_report); accumulator_findings: the paths whose
    measured accumulator keeps fewer bits than the backend declares (each failed the run)."""
    from verify.report.document import SCHEMA_VERSION, finite_json  # noqa: PLC0415

    return finite_json({"kind": LAYER_REPORT_KIND, "schema_version": SCHEMA_VERSION, "checkpoint": str(checkpoint),
                        "tokens": tokens, "backend": backend, "fingerprint": fingerprint, "environment": environment,
                        "runs": results, "timings": {rid: r["timings_s"] for rid, r in results.items()},
                        "accumulator_findings": list(accumulator_findings)})
