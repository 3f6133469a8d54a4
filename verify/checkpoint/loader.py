"""The checkpoint loader: `Checkpoint` (an opened directory) and `LayerPlan` (a layer
validated from headers).

`Checkpoint.open(dir)` reads only the JSON files. `Checkpoint.load_layer(i)` finds the tensors
of layer i in the index, opens only the shards that hold them, parses those shards' safetensors
headers, validates every dtype and shape against the schema of the model (chosen from
config.json), and only then reads exactly the bytes of those tensors (counted in
`Checkpoint.io`). Any defect raises one `CheckpointError` subclass naming the file and the
tensor; nothing is returned half-loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from verify.checkpoint.config import (
    ModelConfig, QuantConfig, model_config_from_json, quant_config_from_dir, read_json_object,
)
from verify.checkpoint.defects import scale_defects
from verify.checkpoint.errors import (
    DtypeMismatchError, MalformedConfigError, MissingIndexError, MissingTensorError, NanScaleError,
    NotACheckpointError,
)
from verify.checkpoint.safetensors import (
    INDEX_FILE, SAFETENSORS_DTYPES, IoStats, TensorInfo, read_safetensors_header, read_tensor_bytes,
)
from verify.checkpoint.schema import (
    LayerSchema, LinearSpec, TensorSpec, check_linear_k, check_tensor, layer_schema, linear_format_of,
    linear_tensor_specs,
)
from verify.checkpoint.weights import GatedMlp, LayerWeights, Linear, Router, iter_linears, make_linear

__all__ = ["Checkpoint", "LayerPlan"]


class Checkpoint:
    """An opened checkpoint directory. Cheap to open: only JSON files are read.

    Attributes: directory, config (ModelConfig), quant (QuantConfig | None),
    weight_map (tensor name -> shard file name), io (IoStats of every read since open).
    """

    def __init__(self, directory: Path, config: ModelConfig, config_raw: Mapping, quant: QuantConfig | None,
                 weight_map: Mapping[str, str], index_path: Path | None):
        self.directory = directory
        self.config = config
        self.config_raw = config_raw
        self.quant = quant
        self.weight_map = dict(weight_map)
        self.index_path = index_path
        self.io = IoStats()
        self._headers: dict[str, dict[str, TensorInfo]] = {}

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "Checkpoint":
        d = Path(directory)
        if not d.is_dir():
            raise NotACheckpointError("not a directory", file=d)
        cfg_path = d / "config.json"
        if not cfg_path.exists():
            raise NotACheckpointError("no config.json: not a Hugging Face checkpoint directory", file=d)
        raw = read_json_object(cfg_path, MalformedConfigError)
        config = model_config_from_json(raw, cfg_path)
        quant = quant_config_from_dir(d, raw)
        index_path = d / INDEX_FILE
        stats = IoStats()
        if index_path.exists():
            idx = read_json_object(index_path, MissingIndexError)
            wm = idx.get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise MissingIndexError("index has no (or an empty) weight_map", file=index_path)
            bad = next((n for n, shard in wm.items() if not isinstance(shard, str) or not shard), None)
            if bad is not None:
                raise MissingIndexError(f"weight_map maps it to {wm[bad]!r}, not a file name", file=index_path,
                                        tensor=bad)
            ck = cls(d, config, raw, quant, wm, index_path)
        else:
            shards = sorted(p for p in d.glob("*.safetensors"))
            if not shards:
                raise NotACheckpointError("no *.safetensors files and no index", file=d)
            if len(shards) > 1:
                raise MissingIndexError(f"{len(shards)} safetensors shards but no {INDEX_FILE}: cannot tell which "
                                        "shard holds which tensor", file=index_path)
            infos = read_safetensors_header(shards[0], stats)
            ck = cls(d, config, raw, quant, {n: shards[0].name for n in infos}, None)
            ck._headers[shards[0].name] = infos
        ck.io.files_opened.extend(stats.files_opened)
        ck.io.header_bytes += stats.header_bytes
        return ck

    # ------------------------------------------------------------------ headers

    def _where(self, name: str) -> Path:
        return self.index_path or (self.directory / next(iter(self.weight_map.values())))

    def headers_for(self, names: Iterable[str]) -> dict[str, TensorInfo]:
        """Header entries of `names`, parsing only the shards that hold them."""
        names = list(names)
        for n in names:
            if n not in self.weight_map:
                raise MissingTensorError("not in the checkpoint's weight_map", file=self._where(n), tensor=n)
        out: dict[str, TensorInfo] = {}
        for n in names:
            shard = self.weight_map[n]
            if shard not in self._headers:
                self._headers[shard] = read_safetensors_header(self.directory / shard, self.io)
            info = self._headers[shard].get(n)
            if info is None:
                raise MissingTensorError(f"the index maps it to {shard}, which does not hold it",
                                         file=self.directory / shard, tensor=n)
            out[n] = info
        return out

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    # ------------------------------------------------------------------ reading

    def read_tensors(self, infos: list[TensorInfo], *, device: torch.device | str = "cpu") -> Tensor:
        """Stack tensors of one dtype and shape: [len(infos), *shape] in their stored dtype."""
        first = infos[0]
        dst = torch.empty((len(infos), first.nbytes), dtype=torch.uint8, device=device)
        read_tensor_bytes(infos, dst, self.io)
        dtype = SAFETENSORS_DTYPES[first.dtype]
        return dst.view(dtype).reshape(len(infos), *first.shape)

    def read_tensor(self, info: TensorInfo, *, device: torch.device | str = "cpu") -> Tensor:
        return self.read_tensors([info], device=device)[0]

    def get_tensor(self, name: str, *, device: torch.device | str = "cpu") -> Tensor:
        """One tensor by name, as stored."""
        return self.read_tensor(self.headers_for([name])[name], device=device)

    # ------------------------------------------------------------------ layer

    def layer_names(self, i: int) -> list[str]:
        """Every tensor name of layer i in the index (`layers.{i}.` after the schema's prefix)."""
        return self.names_with_prefix(layer_schema(self.config, i).prefix + ".")

    def plan_layer(self, i: int) -> "LayerPlan":
        """Validate layer i against the schema using headers only (no tensor data read)."""
        schema = layer_schema(self.config, i)
        present = self.layer_names(i)
        infos = self.headers_for(present)
        # A layer's linears: every LinearSpec must exist; its format comes from the stored dtypes.
        linears: dict[str, tuple[LinearSpec, str, list[TensorSpec]]] = {}
        for spec in schema.linear_specs():
            if f"{spec.module}.weight" not in infos:
                raise MissingTensorError("required by the schema, not in the weight_map", file=self._where(spec.module),
                                         tensor=f"{spec.module}.weight")
            fmt = linear_format_of(spec.module, infos)
            check_linear_k(spec, fmt, infos[f"{spec.module}.weight"].file)
            linears[spec.module] = (spec, fmt, linear_tensor_specs(fmt, spec.module, spec.n, spec.k, infos))
        plain = list(schema.norms) + list(schema.router)
        for tspec in plain + [t for (_, _, ts) in linears.values() for t in ts]:
            info = infos.get(tspec.name)
            if info is None:
                raise MissingTensorError("required by the schema, not in the weight_map",
                                         file=self._where(tspec.name), tensor=tspec.name)
            check_tensor(info, tspec)
        used = {t.name for t in plain} | {t.name for (_, _, ts) in linears.values() for t in ts}
        extras = [n for n in present if n not in used]
        return LayerPlan(i, schema, infos, linears, plain, extras)

    def load_layer(self, i: int, *, device: torch.device | str = "cpu", check_scales: bool = True) -> LayerWeights:
        """Layer i as typed objects. Opens only the shards that hold `layers.{i}.` tensors.

        check_scales: raise NanScaleError for NaN scale bytes or non-finite / non-positive
        global scales (lint passes False and reports them as findings instead).
        """
        plan = self.plan_layer(i)
        schema = plan.schema
        experts = None
        if schema.experts:
            experts = self._load_stack([t for t in schema.experts], plan, device)
        shared = self._load_stack([schema.shared], plan, device, stacked=False) if schema.shared else None
        dense = self._load_stack([schema.dense], plan, device, stacked=False) if schema.dense else None
        attention = {s.role: self._load_linear([s.module], plan, device, stacked=False) for s in schema.attention}
        norms: dict[str, Tensor] = {}
        router_t: dict[str, Tensor] = {}
        for tspec in plan.plain:
            t = self.read_tensor(plan.infos[tspec.name], device=device)
            (norms if tspec in schema.norms else router_t)[tspec.role] = t
        router = None
        if "gate_weight" in router_t:
            tid = router_t.get("tid2eid")
            router = Router(router_t["gate_weight"], router_t.get("gate_bias"),
                            tid.to(torch.int64) if tid is not None else None)
        extras = {n[len(schema.prefix) + 1:]: self.read_tensor(plan.infos[n], device=device) for n in plan.extras}
        layer = LayerWeights(i, self.config.schema, attention, norms, router, experts, shared, dense, extras)
        if check_scales:
            for module, lin in iter_linears(layer):
                bad = scale_defects(lin)
                if bad:
                    info = plan.infos.get(bad[0][0])
                    raise NanScaleError(bad[0][1], file=info.file if info else None, tensor=bad[0][0])
        return layer

    def _load_stack(self, trios: list[tuple[LinearSpec, LinearSpec, LinearSpec]], plan: "LayerPlan",
                    device, stacked: bool = True) -> GatedMlp:
        mods = [[t[j].module for t in trios] for j in range(3)]
        return GatedMlp(*(self._load_linear(m, plan, device, stacked) for m in mods))

    def _load_linear(self, modules: list[str], plan: "LayerPlan", device, stacked: bool) -> Linear:
        fmts = {plan.linears[m][1] for m in modules}
        if len(fmts) != 1:
            raise DtypeMismatchError(f"an expert stack mixes formats {sorted(fmts)}", tensor=modules[0] + ".weight")
        fmt = fmts.pop()
        role_to_t: dict[str, Tensor] = {}
        for j, tspec in enumerate(plan.linears[modules[0]][2]):
            infos = [plan.infos[plan.linears[m][2][j].name] for m in modules]
            t = self.read_tensors(infos, device=device)
            role_to_t[tspec.role] = t if stacked else t[0]
        name = modules[0] if not stacked else modules[0].replace(".experts.0.", ".experts.*.")
        return make_linear(fmt, name, role_to_t)

    # ------------------------------------------------------------------ mtp

    def load_prefix_linears(self, prefix: str, *, device: torch.device | str = "cpu") -> dict[str, Linear]:
        """Every linear under `prefix` (e.g. "mtp.0."), format detected from dtypes, shapes as stored
        (no schema): this is how `mtp.*` MXFP4 experts are read."""
        names = self.names_with_prefix(prefix)
        infos = self.headers_for(names)
        out: dict[str, Linear] = {}
        for n in names:
            if not n.endswith(".weight"):
                continue
            module = n[: -len(".weight")]
            fmt = linear_format_of(module, infos)
            w = infos[n]
            n_rows, cols = w.shape[-2], w.shape[-1]
            k = cols * 2 if fmt in ("nvfp4", "mxfp4") else cols
            specs = linear_tensor_specs(fmt, module, n_rows, k, infos)
            for s in specs:
                if s.name not in infos:
                    raise MissingTensorError("required for its format", file=w.file, tensor=s.name)
                check_tensor(infos[s.name], s)
            out[module] = make_linear(fmt, module, {s.role: self.read_tensor(infos[s.name], device=device)
                                                    for s in specs})
        return out


@dataclass(frozen=True)
class LayerPlan:
    """Layer i validated from headers: infos per tensor, per linear (spec, format, tensor specs),
    the plain tensors and the names the schema does not know (extras)."""

    index: int
    schema: LayerSchema
    infos: Mapping[str, TensorInfo]
    linears: Mapping[str, tuple[LinearSpec, str, list[TensorSpec]]]
    plain: list[TensorSpec]
    extras: list[str]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())
